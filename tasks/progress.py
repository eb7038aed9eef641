"""A Prefect progress artifact over denoising steps, fed by jobs running anywhere."""

from __future__ import annotations

import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.exceptions import MissingContextError


class StepProgress:
    """Progress of a job's items, updated at most once a second.

    Each item counts equally: an item at step s of n contributes s/n of its share.
    """

    def __init__(self, num_items: int, description: str) -> None:
        self.num_items = max(num_items, 1)
        self.fraction_done: dict[str, float] = {}
        self.last_update = 0.0
        try:
            self.artifact_id = create_progress_artifact(0.0, description=description)
        except MissingContextError:  # called outside a run (e.g. `.fn()` in a test)
            self.artifact_id = None

    def __call__(self, item_id: str, step: int, total: int) -> None:
        self.fraction_done[item_id] = step / total
        now = time.monotonic()
        if self.artifact_id is None or (now - self.last_update < 1.0 and step < total):
            return
        self.last_update = now
        percent = 100.0 * sum(self.fraction_done.values()) / self.num_items
        update_progress_artifact(self.artifact_id, min(percent, 100.0))
