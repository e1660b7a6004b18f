"""Planning: how a run will train and fit its hardware. The Method enum, the LoRA and training
settings, the memory estimator (from the model's config, no weights), the method and micro-batch
selector, and work-pool routing. Imports nothing heavier than pydantic, and nothing from the top of
tasks/, the engine, Prefect or torch."""
