"""Shared by the SLURM tests: whether a usable cluster runs, and a job's attempts from accounting.

Needs a running SLURM with accounting (CI starts ../shared/slurm/start_local_slurm.sh with SLURM_NODES=2,
see .ci/run). Without one the tests skip and say why; where .ci/run started it (LLM_PRETRAIN_REQUIRE_SLURM=1)
they fail instead."""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers import ledger, losses

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")


def slurm_problem(need_nodes: int = 1) -> str | None:
    """Why SLURM cannot run jobs of `need_nodes` nodes here, or None."""
    if not shutil.which("sbatch"):
        return "sbatch not found (start one with ../shared/slurm/start_local_slurm.sh)"
    for cmd in (["scontrol", "ping"], ["sacct", "-n", "-X", "-j", "1"]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if any(c.isalpha() for c in ln)]
            return f"`{' '.join(cmd)}` failed: {lines[0] if lines else proc.returncode}"
    if need_nodes > 1 and len(nodes()) < need_nodes:
        return (f"the cluster has {len(nodes())} node(s), these tests need {need_nodes} "
                f"(SLURM_NODES={need_nodes} ../shared/slurm/start_local_slurm.sh)")
    return None


def require_slurm(need_nodes: int = 1) -> None:
    """Skip (or, under .ci/run, fail) unless SLURM can run jobs of `need_nodes` nodes."""
    problem = slurm_problem(need_nodes)
    if problem:
        if os.environ.get("LLM_PRETRAIN_REQUIRE_SLURM") == "1":  # .ci/run started SLURM: it must work
            pytest.fail(f"SLURM is required here but {problem}")
        pytest.skip(f"no usable SLURM: {problem}")


def nodes() -> list[str]:
    """The cluster's node names."""
    return sorted(set(subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split()))


# The node the multi-node drills take down (tests/e2e/test_slurm_multinode.py): one-node jobs stay off it.
DRILL_NODE = "node2"


def one_node_opts() -> list[str]:
    """sbatch options for a one-node job: off the drill node, where the cluster has it."""
    return [f"--exclude={DRILL_NODE}"] if DRILL_NODE in nodes() else []


def attempts(job_id: str) -> list[tuple[str, str]]:
    """(state, exit code) of each run of the job, first first (a requeued run shows REQUEUED)."""
    proc = subprocess.run(["sacct", "--duplicates", "-X", "-n", "-P", "-j", job_id, "-o", "State,ExitCode"],
                          capture_output=True, text=True, check=True)
    return [tuple(line.split("|")) for line in proc.stdout.splitlines() if line]  # a state may hold spaces


def log_text(job: dict) -> str:
    return job["log"].read_text() if Path(job["log"]).is_file() else ""


def wait_done(job: dict, timeout: float = 240, requeued: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Poll sacct (`sbatch --wait` is slow) until the job's last run has ended; returns attempts().
    job: {"id": job id, "log": its output file}. requeued: end states after which SLURM requeues the
    job itself (NODE_FAIL with --requeue), so that more runs follow."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = attempts(job["id"])
        if runs and runs[-1][0].startswith(TERMINAL) and not runs[-1][0].startswith(requeued or ("-",)):
            return runs
        time.sleep(0.5)
    pytest.fail(f"job {job['id']} not done after {timeout} s: {attempts(job['id'])}\n{log_text(job)[-3000:]}")


def sbatch(*args: str, cwd: Path, env: dict) -> str:
    """Submit; returns the job id."""
    proc = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"sbatch {' '.join(args)} failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def assert_resumed_without_loss(job: dict, steps: int, batch: int, signalled_at: int = 0) -> list[int]:
    """Every sample of steps 1..steps consumed exactly once, each attempt resuming exactly where the
    previous one checkpointed; returns the steps at which attempts stopped."""
    text, run = log_text(job), job["run"]
    stopped = [int(s) for s in re.findall(r"checkpointing at step (\d+) and exiting", text)]
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", text)]
    assert stopped and resumed == stopped, f"stops at {stopped}, resumes at {resumed}"
    assert stopped[0] >= signalled_at, "the checkpoint is older than the signal"
    consumed = ledger(run)
    assert sorted(consumed) == list(range(1, steps + 1))
    assert [s for step in sorted(consumed) for s in consumed[step]] == list(range(steps * batch))  # no gap, no repeat
    # Lost work: steps a stopped attempt ran past its checkpoint and the next attempt re-did. The
    # stop protocol checkpoints the step it stops after, so nothing is lost.
    for f in (run / "ledger").glob("rank*.jsonl"):
        assert len(f.read_text().splitlines()) == steps, f"{f.name}: some steps were run twice"
    assert max(losses(run)) == steps
    return stopped


def wait_for_steps(job: dict, n: int, timeout: float = 180) -> int:
    """Wait until the job has logged n steps; returns the last logged."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        logged = losses(job["run"]) if (job["run"] / "metrics.jsonl").is_file() else {}
        if len(logged) >= n:
            return max(logged)
        runs = attempts(job["id"])  # empty until accounting has heard of the job
        assert not (runs and runs[-1][0].startswith(TERMINAL)), log_text(job)[-3000:]
        time.sleep(0.2)
    pytest.fail(f"job {job['id']} logged no {n} steps in {timeout} s\n{log_text(job)[-3000:]}")


def job_workers(run) -> list[int]:
    """The training processes of the job writing to run: `python -u launch/pretrain.py ...`, whose
    command line, unlike srun's (and its shepherd's) and the agent's, has no launch/slurm/torchrun.py."""
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue  # it ended while we looked
        if (f"hydra.run.dir={run}" in args and any(a.endswith("launch/pretrain.py") for a in args)
                and not any(a.endswith("torchrun.py") for a in args)):
            out.append(int(proc.name))
    return out
