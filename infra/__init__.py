"""Configs and launchers that run beside the code: the local server stack (Prefect, MLflow, S3), the
Accelerate/DeepSpeed configs, the Kubernetes templates, and the Debian packages the tests use."""
