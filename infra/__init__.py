"""Service launchers and launch configs: the local stack (Prefect, MLflow, S3), Accelerate/DeepSpeed, Kubernetes."""
