"""The sample ledger: which global samples each step consumed on this rank, one JSON line per step
in `<run>/ledger/rank<r>.jsonl`. After a resume or rollback the re-done steps are appended again; the
last line of a step is the one that counts."""

import json
from pathlib import Path


class SampleLedger:
    def __init__(self, run_dir: Path, rank: int):
        (run_dir / "ledger").mkdir(exist_ok=True)
        self.file = open(run_dir / "ledger" / f"rank{rank}.jsonl", "a")

    def record(self, step: int, sample_index) -> None:
        self.file.write(json.dumps({"step": step, "samples": sample_index.tolist()}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
