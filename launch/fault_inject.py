"""Kill training at random moments; check each restart resumes from a complete checkpoint and the
end result equals an uninterrupted run, bit for bit.

    python launch/fault_inject.py --trials 20 --seed 0        # 3-5 minutes on 2 CPU cores

It trains the debug model (a tiny shape) on real text on 2 CPU ranks under torchrun, checkpointing
every 2 steps. Each trial SIGKILLs one random rank at a random moment of one of these phases:
  startup     a random delay after launch: imports, process group, shard checks, checkpoint load
  step        a random point after the run has made some steps
  loader      right after the rank drew a batch (the loader moved on, no checkpoint holds that yet)
  checkpoint  while `checkpoints/.tmp-step_*` exists, i.e. while a save is being written
and restarts the job (checkpoint.resume=auto), until the run completes. After every kill `latest`
must name a complete checkpoint (every DCP file its .metadata lists, full length, and
train_state.json), and the restart must say "resumed from" exactly that folder (or start fresh
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PHASES = ("startup", "step", "loader", "checkpoint")
KILLS_PER_RUN = 6  # then let the run finish, so each run ends and is compared
TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "data.seq_len=64",
        "log_interval=1", "val_batches=0", "data.unigram_baseline=false", "optim.warmup_steps=2", "optim.lr=3e-3",
        "global_batch_size=4", "micro_batch_size=2", "wandb.mode=disabled", "sample_prompt=''",
        "checkpoint.save_final=true", "checkpoint.keep_last=2"]


def build_data(root: Path) -> list[str]:
    """A 512-piece tokenizer and a shard set of four real plays."""
    from data_pipeline.build import build_shards
    from data_pipeline.sample_corpus import sample_corpus_dir
    from data_pipeline.tokenizer import train_tokenizer

    files = [str(p) for p in sorted(sample_corpus_dir().glob("*.txt"))[:4]]
    tok = train_tokenizer(files, root / "tok.model", vocab_size=512)
    shards = build_shards(files, root / "shards", tok, val_fraction=0.25, num_proc=1, progress=False).parent
    return ["data.demo=false", f"data.tokenizer={tok.path}", f"data.shards=[{shards}]"]


def command(run: Path, nproc: int, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(REPO / "launch" / "pretrain.py"), "+conf=debug", f"hydra.run.dir={run}", *overrides]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def workers(pid: int) -> dict[int, int]:
    """torchrun's worker processes by rank, from /proc."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != pid:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        for var in environ:
            if var.startswith(b"RANK="):
                out[int(var[5:])] = int(stat.parent.name)
    return out


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
    """The checkpoint a restart must load (and a problem, if `latest` names a broken one)."""
    folder = run / "checkpoints"
    pointer = folder / "latest"
    if pointer.is_file():
        named = folder / pointer.read_text().strip()
        return (named, "") if complete(named) else (None, f"latest names {named.name}, which is not complete")
    done = sorted(p for p in folder.glob("step_*") if complete(p)) if folder.is_dir() else []
    return (done[-1] if done else None), ""


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
    """Every tensor of the final checkpoint, its train state, the losses and the sample ledger."""
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
    losses, ledger = {}, {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            losses[row["step"]] = row["loss"]  # a step re-done after a resume: the last one counts
    for f in sorted((run / "ledger").glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            ledger[(f.name, row["step"])] = row["samples"]
    return {"tensors": tensors, "train_state": json.loads((path / "train_state.json").read_text()),
            "losses": losses, "ledger": ledger}


def differences(a: dict, b: dict) -> list[str]:
    import torch

    out = [f"{key} differs" for key in ("train_state", "losses", "ledger") if a[key] != b[key]]
    if a["tensors"].keys() != b["tensors"].keys():
        out.append("tensor names differ")
    out += [f"tensor {k} differs" for k in a["tensors"] if k in b["tensors"]
            and not torch.equal(a["tensors"][k], b["tensors"][k])]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20, help="kills to inject (over as many runs as needed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    p.add_argument("--steps", type=int, default=12, help="steps per training run")
    p.add_argument("--interval", type=int, default=2, help="checkpoint.interval")
    p.add_argument("--workdir", type=Path, default=None, help="keep runs and logs here (default: a temp dir, removed)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fault-inject-"))
    work.mkdir(parents=True, exist_ok=True)
    overrides = [*TINY, *build_data(work), f"steps={args.steps}", f"checkpoint.interval={args.interval}"]

    t0 = time.time()
    reference = work / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    status, _, _ = attempt(command(reference, 2, overrides), reference, work / "reference.log", None, rng, 0,
                        args.steps)
    if status != 0:
        print(f"the uninterrupted reference run failed ({status}); see {work / 'reference.log'}", file=sys.stderr)
        return 1
    want = final_state(reference, args.steps)

    counts = dict(runs=0, attempts=0, kills=0, mid_write=0, resumes=0, fresh_starts=0, mismatches=0)
    by_phase = dict.fromkeys(PHASES, 0)
    problems: list[str] = []
    while counts["kills"] < args.trials:
        counts["runs"] += 1
        run = work / f"run{counts['runs']}"
        shutil.rmtree(run, ignore_errors=True)
        expect, start_step, run_kills = None, 0, 0
        while True:
            counts["attempts"] += 1
            log = work / f"run{counts['runs']}-attempt{counts['attempts']}.log"
            kill = run_kills < KILLS_PER_RUN and counts["kills"] < args.trials
            phase = rng.choice(PHASES) if kill else None
            status, killed, trained = attempt(command(run, 2, overrides), run, log, phase, rng, start_step, args.steps)
            text = log.read_text()
            # A start resumes from exactly the checkpoint we expect, or (with none) starts fresh.
            found = re.search(r"resumed from (\S+) at step (\d+)", text)
            if (found and Path(found[1]) != expect) or (expect and trained and not found):
                problems.append(f"{log.name}: expected to resume from {expect}, log says "
                                f"{found[0] if found else 'no resume'}")
            counts["resumes"] += bool(found)
            counts["fresh_starts"] += not found and trained
            if status is None:
                problems.append(f"{log.name}: still running after 300 s (hung)")
                break
            if killed is None:
                if status != 0:
                    problems.append(f"{log.name}: the run failed with status {status} without a kill")
                else:
                    problems += [f"run{counts['runs']}: {d}" for d in differences(final_state(run, args.steps), want)]
                break
            counts["kills"] += 1
            counts["mid_write"] += killed["mid_write"]
            by_phase[killed["phase"]] += 1
            run_kills += 1
            expect, problem = resume_point(run)
            if problem:
                problems.append(f"{log.name}: {problem}")
            start_step = json.loads((expect / "train_state.json").read_text())["step"] if expect else 0
            print(f"run {counts['runs']} kill {counts['kills']}: rank {killed['rank']} in {killed['phase']}"
                  f"{' (mid-write)' if killed['mid_write'] else ''}; next start from "
                  f"{expect.name if expect else 'scratch'}", flush=True)
    counts["mismatches"] = len(problems)
    for problem in problems:
        print("MISMATCH", problem, file=sys.stderr)
    print(f"trials (kills) {counts['kills']} over {counts['runs']} runs and {counts['attempts']} starts; "
          f"kills by phase {by_phase}, {counts['mid_write']} during a checkpoint write; "
          f"resumes {counts['resumes']}, fresh starts {counts['fresh_starts']}; "
          f"mismatches {counts['mismatches']} ({time.time() - t0:.0f} s)")
    if args.workdir is None and not problems:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
