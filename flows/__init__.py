"""Prefect flows: they only sequence the tasks of `tasks/`; each runs as `python -m flows.<name>`."""
