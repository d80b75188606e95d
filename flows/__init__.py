"""Prefect flows: the deployment entrypoints."""
