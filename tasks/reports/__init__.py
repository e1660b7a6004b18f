"""Reports: what a person reads about a run. The markdown summary, the loss curve and the model
card, all made from a manifest. May import planning and scoring; never the top of tasks/, the
engine, Prefect or torch."""
