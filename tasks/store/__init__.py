"""Storage: one layer for local folders and S3. URIs, reads, listings, conditional writes,
checksummed folder transfer, the registry of published runs (latest.json), manifests, checkpoint
uploads, and what a model folder may do when loaded. Pure: boto3 only; never Prefect or torch."""
