"""Kill training at random moments; check each restart resumes from a complete checkpoint and the
end result equals an uninterrupted run, bit for bit.

    python tests/support/fault_inject.py --trials 20 --seed 0        # 3-5 minutes on 2 CPU cores

It trains the debug model (a tiny shape) on real text on 2 CPU ranks under torchrun, checkpointing
every 2 steps. Each trial SIGKILLs one random rank at a random moment of one of these phases, taken
in rounds that visit every phase once in a random order (so 4 trials cover all four):
  startup     a random delay after launch: imports, process group, shard checks, checkpoint load
  step        a random point after the run has made some steps
  loader      right after the rank drew a batch (the loader moved on, no checkpoint holds that yet)
  checkpoint  while `checkpoints/.tmp-step_*` exists, i.e. while a save is being written
and restarts the job (checkpoint.resume=auto), until the run completes. After every kill `latest`
must name a complete checkpoint (every DCP file its .metadata lists, full length, and
train_state.json), and the restart must say "resumed from" exactly that folder, or the newer save a
kill left written in full but not yet renamed, which the restart puts in place (or start fresh
when there is none). A completed run must end with the reference run's tensors (model and
optimizer), train state, per-step losses and sample ledger. Several runs are killed in turn until
--trials kills are done. Exit status 1 on any mismatch.
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from helpers import REPO, TINY, env, ledger_by_rank, losses, pretrain_cmd, tiny_data_in, workers

sys.path.insert(0, str(REPO))  # run as a script from anywhere: the repository's packages import

PHASES = ("startup", "step", "loader", "checkpoint")
KILLS_PER_RUN = 6  # then let the run finish, so each run ends and is compared
# TINY on 2 ranks with micro-batches of 2, no validation, and a final checkpoint to compare (later overrides win).
OVERRIDES = [*TINY, "val_batches=0", "data.unigram_baseline=false", "global_batch_size=4", "micro_batch_size=2",
             "checkpoint.save_final=true", "checkpoint.keep_last=2"]


def size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def last_step(path: Path, skip: int) -> int:
    """The step of the last line of metrics.jsonl or a ledger file, written after its first `skip`
    bytes (0 if none: earlier attempts' lines do not count)."""
    try:
        text = path.read_bytes()[skip:].rstrip(b"\n")
        return json.loads(text.rsplit(b"\n", 1)[-1])["step"] if text else 0
    except (OSError, ValueError, KeyError):
        return 0


def saving_step(run: Path) -> int:
    """The step of a checkpoint being written now (0 if none)."""
    folder = run / "checkpoints"
    found = folder.glob(".tmp-step_*") if folder.is_dir() else []
    return max((int(p.name.split("_")[1]) for p in found), default=0)


def complete(path: Path) -> bool:
    """Stricter than the trainer's check: every file .metadata refers to is there at full length."""
    import torch.distributed.checkpoint as dcp

    if not (path / ".metadata").is_file() or not (path / "train_state.json").is_file():
        return False
    try:
        json.loads((path / "train_state.json").read_text())
        meta = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception:
        return False
    need: dict[str, int] = {}
    for info in meta.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    return all((path / f).is_file() and (path / f).stat().st_size >= n for f, n in need.items())


def resume_point(run: Path) -> tuple[Path | None, str]:
    """The checkpoint a restart must load (and a problem, if `latest` names a broken one). A save killed after its
    last file was written but before its rename is put in place by the restart (Checkpointer.recover), and
    `latest` then names it."""
    folder = run / "checkpoints"
    if not folder.is_dir():
        return None, ""
    pointer, problem = folder / "latest", ""
    if pointer.is_file():
        named = folder / pointer.read_text().strip()
        done = [named] if complete(named) else []
        problem = "" if done else f"latest names {named.name}, which is not complete"
    else:
        done = sorted(p for p in folder.glob("step_*") if complete(p))
    written = sorted(folder / p.name.removeprefix(".tmp-") for p in folder.glob(".tmp-step_*") if complete(p))
    last = (done + written)[-1] if done + written else None
    return last, problem


def attempt(cmd: list[str], run: Path, log: Path, phase: str | None, rng: random.Random, start: int, steps: int):
    """Run the job once (it resumes from step `start`), killing a random rank in `phase` (None: let
    it finish). Returns (exit status or None if it hung, what was killed or None, whether it trained)."""
    target = rng.randrange(2)
    # Kill at a random step of what is left, so a run moves on between kills and ends.
    at = rng.randint(min(start + 1, steps), steps)  # start == steps: killed after the last save
    delay = rng.uniform(0.5, 6.0)  # startup: about the time to the first step on 2 busy cores
    jitter = rng.uniform(0.0, 0.1 if phase == "step" else 0.01)
    metrics, ledger = run / "metrics.jsonl", run / "ledger" / f"rank{target}.jsonl"
    seen = {metrics: size(metrics), ledger: size(ledger)}

    def trained() -> bool:  # this attempt finished a step
        return size(metrics) > seen[metrics]

    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=run.parent, env=env(), stdout=out, stderr=subprocess.STDOUT)
    killed = None
    while proc.poll() is None and time.time() - t0 < 300:
        fire = not killed and (phase == "startup" and time.time() - t0 > delay
                               or phase == "step" and last_step(metrics, seen[metrics]) >= at
                               or phase == "loader" and last_step(ledger, seen[ledger]) >= at
                               # once this attempt trained: a folder left by the last kill is no save
                               or phase == "checkpoint" and trained() and saving_step(run) >= at)
        if fire:
            time.sleep(jitter)
            pid = workers(proc.pid).get(target)
            if pid is not None:  # else not started yet or already gone: look again
                mid_write = trained() and saving_step(run) > 0
                os.kill(pid, signal.SIGKILL)
                killed = {"phase": phase, "rank": target, "mid_write": mid_write}
        time.sleep(0.005)
    if proc.poll() is None:  # a hang is a failure too: end the workers, then torchrun
        for pid in workers(proc.pid).values():
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
        return None, killed, trained()
    return proc.wait(), killed, trained()


def final_state(run: Path, steps: int) -> dict:
    """Every tensor of the final checkpoint, its train state, the losses and each rank's sample ledger."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = run / "checkpoints" / f"step_{steps:08d}"
    meta = dcp.FileSystemReader(str(path)).read_metadata()
    tensors = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()
               if isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process": it is
        dcp.load(tensors, checkpoint_id=str(path), no_dist=True)
    return {"tensors": tensors, "train_state": json.loads((path / "train_state.json").read_text()),
            "losses": losses(run), "ledger": ledger_by_rank(run)}


def differences(a: dict, b: dict) -> list[str]:
    import torch

    out = [f"{key} differs" for key in ("train_state", "losses", "ledger") if a[key] != b[key]]
    if a["tensors"].keys() != b["tensors"].keys():
        out.append("tensor names differ")
    out += [f"tensor {k} differs" for k in a["tensors"] if k in b["tensors"]
            and not torch.equal(a["tensors"][k], b["tensors"][k])]
    return out


@dataclass
class Tally:
    """What the trials did, and every problem found."""
    runs: int = 0
    attempts: int = 0
    kills: int = 0
    mid_write: int = 0
    resumes: int = 0
    fresh_starts: int = 0
    by_phase: dict = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    problems: list[str] = field(default_factory=list)
    round: list[str] = field(default_factory=list)  # the phases of this round not killed in yet

    def next_phase(self, rng: random.Random) -> str:
        """The phase of the next kill: each round of len(PHASES) kills visits every phase once, in a random
        order. A phase leaves the round only once a kill in it happened (see after_kill): a chosen
        moment that never came (the run ended first) is tried again."""
        if not self.round:
            self.round = rng.sample(PHASES, len(PHASES))
        return self.round[-1]

    def summary(self, seconds: float) -> str:
        return (f"trials (kills) {self.kills} over {self.runs} runs and {self.attempts} starts; "
                f"kills by phase {self.by_phase}, {self.mid_write} during a checkpoint write; "
                f"resumes {self.resumes}, fresh starts {self.fresh_starts}; "
                f"mismatches {len(self.problems)} ({seconds:.0f} s)")


def check_start(log: Path, expect: Path | None, trained: bool, tally: Tally) -> None:
    """A start resumes from exactly the checkpoint expected or, when there is none, starts fresh."""
    found = re.search(r"resumed from (\S+) at step (\d+)", log.read_text())
    if (found and Path(found[1]) != expect) or (expect and trained and not found):
        tally.problems.append(f"{log.name}: expected to resume from {expect}, log says "
                              f"{found[0] if found else 'no resume'}")
    tally.resumes += bool(found)
    tally.fresh_starts += not found and trained


def after_kill(run: Path, log: Path, killed: dict, tally: Tally) -> Path | None:
    """Count the kill and check `latest`; returns the checkpoint the restart must load (None: start fresh)."""
    tally.kills += 1
    tally.mid_write += killed["mid_write"]
    tally.by_phase[killed["phase"]] += 1
    tally.round.remove(killed["phase"])
    expect, problem = resume_point(run)
    if problem:
        tally.problems.append(f"{log.name}: {problem}")
    print(f"run {tally.runs} kill {tally.kills}: rank {killed['rank']} in {killed['phase']}"
          f"{' (mid-write)' if killed['mid_write'] else ''}; next start from {expect.name if expect else 'scratch'}",
          flush=True)
    return expect


def one_run(work: Path, overrides: list[str], want: dict, args, rng: random.Random, tally: Tally) -> None:
    """Train one run to its end, killing a random rank in a random phase and restarting, up to KILLS_PER_RUN
    times (and --trials kills in all); the finished run must end exactly like the reference `want`."""
    tally.runs += 1
    run = work / f"run{tally.runs}"
    shutil.rmtree(run, ignore_errors=True)
    expect, start_step, run_kills = None, 0, 0
    while True:
        tally.attempts += 1
        log = work / f"run{tally.runs}-attempt{tally.attempts}.log"
        kill = run_kills < KILLS_PER_RUN and tally.kills < args.trials
        phase = tally.next_phase(rng) if kill else None
        status, killed, trained = attempt(pretrain_cmd(2, run, *overrides), run, log, phase, rng, start_step,
                                          args.steps)
        check_start(log, expect, trained, tally)
        if status is None:
            tally.problems.append(f"{log.name}: still running after 300 s (hung)")
            return
        if killed is None:  # the uninterrupted last attempt
            if status != 0:
                tally.problems.append(f"{log.name}: the run failed with status {status} without a kill")
            else:
                tally.problems += [f"{run.name}: {d}" for d in differences(final_state(run, args.steps), want)]
            return
        run_kills += 1
        expect = after_kill(run, log, killed, tally)
        start_step = int(expect.name.split("_")[1]) if expect else 0  # it may still be a .tmp- folder's


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20, help="kills to inject (over as many runs as needed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    p.add_argument("--steps", type=int, default=12, help="steps per training run")
    p.add_argument("--interval", type=int, default=2, help="checkpoint.interval")
    p.add_argument("--workdir", type=Path, default=None, help="keep runs and logs here (default: a temp dir, removed)")
    p.add_argument("--data", type=Path, default=None,
                   help="folder of the tiny tokenizer and shards, reused when built (default: in the workdir)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fault-inject-"))
    work.mkdir(parents=True, exist_ok=True)
    overrides = [*OVERRIDES, *tiny_data_in(args.data or work), f"steps={args.steps}",
                 f"checkpoint.interval={args.interval}"]

    t0 = time.time()
    reference = work / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    status, _, _ = attempt(pretrain_cmd(2, reference, *overrides), reference, work / "reference.log", None, rng, 0,
                           args.steps)
    if status != 0:
        print(f"the uninterrupted reference run failed ({status}); see {work / 'reference.log'}", file=sys.stderr)
        return 1
    want = final_state(reference, args.steps)
    tally = Tally()
    while tally.kills < args.trials:
        one_run(work, overrides, want, args, rng, tally)
    for problem in tally.problems:
        print("MISMATCH", problem, file=sys.stderr)
    print(tally.summary(time.time() - t0))
    if args.workdir is None and not tally.problems:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if tally.problems else 0


if __name__ == "__main__":
    sys.exit(main())
