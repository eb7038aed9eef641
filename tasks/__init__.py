"""Prefect tasks: one per pipeline stage, thin wrappers over the engine and the store."""
