"""metrics.jsonl in the output folder (rank 0): one JSON object per line."""
from __future__ import annotations

import json
import os


class Metrics:
    """A new run starts the file afresh, a resumed one appends to it."""

    def __init__(self, output: str | None, main: bool, append: bool):
        self.path = os.path.join(output, "metrics.jsonl") if output and main else None
        if self.path and not append and os.path.exists(self.path):
            os.remove(self.path)

    def write(self, **row) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
