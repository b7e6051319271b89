"""The sample ledger: which global samples each step consumed on this rank, one JSON line per step
in `<run>/ledger/rank<r>.jsonl`. After a resume or rollback the re-done steps are appended again; the
last line of a step is the one that counts."""

import json
from pathlib import Path

from data_pipeline.disk import writing

from .jsonl import open_to_append


class SampleLedger:
    """rank is the data-parallel rank (the global rank without tensor parallelism); enabled=False on the
    other ranks of a TP group, which read the same samples as its first."""

    def __init__(self, run_dir: Path, rank: int, enabled: bool = True):
        (run_dir / "ledger").mkdir(exist_ok=True)
        self.path = run_dir / "ledger" / f"rank{rank}.jsonl"
        self.file = open_to_append(self.path) if enabled else None

    def record(self, step: int, sample_index) -> None:
        if self.file is None:
            return
        with writing(self.path):  # a full disk: one line naming the file
            self.file.write(json.dumps({"step": step, "samples": sample_index.tolist()}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:  # what a failed record left in the buffer: that record raised already, naming the file
                pass
