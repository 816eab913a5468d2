"""Prefect flows and the prefixflow CLI."""
