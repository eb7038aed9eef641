"""Batch jobs on the engine: items, shards and their stages with checkpoints in a store,
run in any process (a Prefect task, a warm worker on a GPU node). Imports no Prefect."""
