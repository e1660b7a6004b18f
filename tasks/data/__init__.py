"""Data: where rows come from and whether they are fit to train on. Sources (local, s3://), readers
(JSONL/CSV/Parquet), the pandera schemas and quality checks, tokenization, and change detection
(freshness, S3 upload events). Pure: imports only other plain packages (store), never Prefect or torch."""
