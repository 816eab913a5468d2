"""Prefect tasks: each a thin wrapper (retries, caching, Prefect logs and artifacts) over a plain function
of prefixflow.services or prefixflow.launch, which is tested without Prefect."""
