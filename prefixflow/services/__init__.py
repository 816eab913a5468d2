"""Services the pipeline uses, without Prefect: the spec, storage (local and S3), MLflow tracking and
registry, data preparation, evaluation and metrics, registration, the run summary."""
