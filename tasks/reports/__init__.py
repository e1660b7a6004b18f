"""Reports: what a person reads about a run. The markdown summary, the loss curve and the model
card, all made from a manifest. Pure: never Prefect or torch."""
