"""The sample ledger: which global samples each step consumed on this rank, one JSON line per step
in `<run>/ledger/rank<r>.jsonl`. After a resume or rollback the re-done steps are appended again; the
last line of a step is the one that counts."""

import json
from pathlib import Path


class SampleLedger:
    """rank is the data-parallel rank (the global rank without tensor parallelism); enabled=False on the
    other ranks of a TP group, which read the same samples as its first."""

    def __init__(self, run_dir: Path, rank: int, enabled: bool = True):
        (run_dir / "ledger").mkdir(exist_ok=True)
        self.file = open(run_dir / "ledger" / f"rank{rank}.jsonl", "a") if enabled else None

    def record(self, step: int, sample_index) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, "samples": sample_index.tolist()}) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
