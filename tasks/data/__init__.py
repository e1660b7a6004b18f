"""Data: where rows come from and whether they are fit to train on. Sources (local, s3://, Hub datasets),
the mix of several sources, readers (JSONL/CSV/Parquet), the pandera schemas and quality checks,
tokenization, change detection (freshness, S3 upload events, which announced uploads have no run) and the
data settings. May import the store package; never the top of tasks/ (stages, config, results), the engine,
Prefect or torch."""
