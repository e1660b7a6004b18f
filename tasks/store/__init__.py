"""Storage: one layer for local folders and S3. URIs, reads, listings, conditional writes,
checksummed folder transfer, the registry of published runs (latest.json), manifests, checkpoint
uploads, and what a model folder may do when loaded. boto3 only: never the top of tasks/, the
engine, Prefect or torch."""
