"""Planning: how a run will fit on its hardware. The memory estimator (from the model's config, no
weights), the method and micro-batch selector, and work-pool routing. Pure: imports nothing heavier
than pydantic; never Prefect, torch or transformers."""
