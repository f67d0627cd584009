"""metrics.jsonl in the output folder (rank 0): one JSON object per line."""
from __future__ import annotations

import json
import os


class Metrics:
    """A new run starts the file afresh, a resumed one appends to it.

    `resume_at=(epoch, global_step)`: the position a resumed run continues from. Rows written
    after it by the interrupted run (training rows past that step, validation and epoch rows of
    that epoch or later, a line cut short by a kill) are dropped, so the resumed run does not
    log them twice.
    """

    def __init__(self, output: str | None, main: bool, append: bool, resume_at: tuple[int, int] | None = None):
        self.path = os.path.join(output, "metrics.jsonl") if output and main else None
        if self.path and not append and os.path.exists(self.path):
            os.remove(self.path)
        if self.path and append and resume_at is not None and os.path.exists(self.path):
            self._truncate(*resume_at)

    def _truncate(self, epoch: int, global_step: int) -> None:
        kept = []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                if not isinstance(row, dict):
                    continue
                if row.get("kind") == "train" and isinstance(row.get("step"), int) and row["step"] > global_step:
                    continue
                if row.get("kind") in ("val", "epoch") and isinstance(row.get("epoch"), int) and row["epoch"] >= epoch:
                    continue
                kept.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, **row) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def read_history(path: str | None) -> list:
    """(epoch, kind, result) of every complete validation in a metrics.jsonl, in file order: the
    record of the starts before a resume, so the run's best covers all of its epochs."""
    history = []
    if not path or not os.path.isfile(path):
        return history
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if (isinstance(row, dict) and row.get("kind") in ("val", "val_ema") and row.get("complete", True)
                    and isinstance(row.get("epoch"), int)
                    and all(isinstance(row.get(k), (int, float)) for k in ("top1", "top5", "loss"))):
                result = {k: row[k] for k in ("top1", "top5", "loss", "n") if k in row}
                history.append((row["epoch"], row["kind"], {**result, "complete": True}))
    return history
