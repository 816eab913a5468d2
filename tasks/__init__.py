"""Prefect tasks over prefix_core and the services (see issue: pipeline)."""
