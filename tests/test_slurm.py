"""launch/slurm/pretrain.sbatch on a real SLURM: a run completes; a run preempted with `scancel --signal`
and one whose time limit is shorter than its work checkpoint, are requeued and resume with no gap or
repeat in the data and the same W&B run; a bad config fails without a requeue, and so does a run whose
process crashes during a stop.

Needs a running SLURM with accounting (CI starts one with ../shared/slurm/start_local_slurm.sh, see
.ci/run); without one these tests skip and say why. The five jobs run at the same time, so the file
takes about as long as its slowest job."""

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import REPO, TINY, env, ledger, losses, tiny_data

B = 4  # global batch
BASE = [*TINY, f"global_batch_size={B}", "micro_batch_size=2", "checkpoint.interval=0",
        "stability.spike_z=0"]  # no loss-spike rollbacks: they skip data on purpose
STEPS = {"complete": 20, "preempt": 300, "timelimit": 600, "crash": 5000}  # crash: its test stops it
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")


def slurm_problem() -> str | None:
    """Why SLURM cannot run these tests, or None."""
    if not shutil.which("sbatch"):
        return "sbatch not found (start one with ../shared/slurm/start_local_slurm.sh)"
    for cmd in (["scontrol", "ping"], ["sacct", "-n", "-X", "-j", "1"]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if any(c.isalpha() for c in ln)]
            return f"`{' '.join(cmd)}` failed: {lines[0] if lines else proc.returncode}"
    return None


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    problem = slurm_problem()
    if problem:
        if os.environ.get("LLM_PRETRAIN_REQUIRE_SLURM") == "1":  # .ci/run started SLURM: it must work
            pytest.fail(f"SLURM is required here but {problem}")
        pytest.skip(f"no usable SLURM: {problem}")
    data = tiny_data(tmp_path_factory)
    root = tmp_path_factory.mktemp("slurm")
    specs = {  # name: (sbatch options, overrides); the time-critical jobs first, in case slots are few
        # SLURM checks time limits every 30 s, so the warning comes 10-40 s before the limit.
        "timelimit": (["--time=1", "--signal=B:USR1@10"], [f"steps={STEPS['timelimit']}"]),
        "preempt": ([], [f"steps={STEPS['preempt']}", "wandb.mode=offline"]),
        "bad": ([], ["global_batch_size=5"]),
        "crash": ([], [f"steps={STEPS['crash']}"]),
        "complete": ([], [f"steps={STEPS['complete']}"]),
    }
    job_env = {**env(), "NPROC_PER_NODE": "2", "PYTHON": sys.executable}
    out = {}
    for name, (opts, overrides) in specs.items():
        run, log = root / name, root / f"{name}.out"
        cmd = ["sbatch", "--parsable", f"--job-name={name}", "--cpus-per-task=1", f"--output={log}", *opts,
               str(REPO / "launch" / "slurm" / "pretrain.sbatch"), "+conf=debug", f"hydra.run.dir={run}",
               *BASE, *data, *overrides]
        proc = subprocess.run(cmd, cwd=REPO, env=job_env, capture_output=True, text=True, check=True)
        out[name] = {"id": proc.stdout.strip().split(";")[0], "run": run, "log": log}
    threading.Thread(target=lift_limit_once_requeued, args=(out["timelimit"]["id"],), daemon=True).start()
    yield out
    subprocess.run(["scancel", *(j["id"] for j in out.values())], capture_output=True)


def lift_limit_once_requeued(job_id: str, timeout: float = 300) -> None:
    """Give the time-limited job's second attempt room to finish: a 1-minute attempt trains only
    about 5-35 s after start-up, so the 600 steps would otherwise take many attempts."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = attempts(job_id)
        if any(state == "REQUEUED" for state, _ in runs):
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=10"], check=True)
            return
        if runs and runs[-1][0].startswith(TERMINAL):
            return
        time.sleep(0.5)


def attempts(job_id: str) -> list[tuple[str, str]]:
    """(state, exit code) of each run of the job, first first (a requeued run shows REQUEUED)."""
    proc = subprocess.run(["sacct", "--duplicates", "-X", "-n", "-P", "-j", job_id, "-o", "State,ExitCode"],
                          capture_output=True, text=True, check=True)
    return [tuple(line.split("|")) for line in proc.stdout.splitlines() if line]  # a state may hold spaces


def wait_done(job: dict, timeout: float = 240) -> list[tuple[str, str]]:
    """Poll sacct (`sbatch --wait` is slow) until the job's last run has ended; returns attempts()."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = attempts(job["id"])
        if runs and runs[-1][0].startswith(TERMINAL):
            return runs
        time.sleep(0.5)
    pytest.fail(f"job {job['id']} not done after {timeout} s: {attempts(job['id'])}\n{log_text(job)[-3000:]}")


def log_text(job: dict) -> str:
    return job["log"].read_text() if job["log"].is_file() else ""


def assert_resumed_without_loss(job: dict, steps: int, signalled_at: int = 0) -> list[int]:
    """Every sample of steps 1..steps consumed exactly once, each attempt resuming exactly where the
    previous one checkpointed; returns the steps at which attempts stopped."""
    text, run = log_text(job), job["run"]
    stopped = [int(s) for s in re.findall(r"checkpointing at step (\d+) and exiting", text)]
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", text)]
    assert stopped and resumed == stopped, f"stops at {stopped}, resumes at {resumed}"
    assert stopped[0] >= signalled_at, "the checkpoint is older than the signal"
    consumed = ledger(run)
    assert sorted(consumed) == list(range(1, steps + 1))
    assert [s for step in sorted(consumed) for s in consumed[step]] == list(range(steps * B))  # no gap, no repeat
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


def test_process_crashing_during_a_stop_fails_the_job_without_requeue(jobs):
    job = jobs["crash"]
    wait_for_steps(job, 3)
    workers = job_workers(job["run"])
    assert len(workers) == 2, workers
    victim = workers[0]
    os.kill(victim, signal.SIGSTOP)  # it cannot checkpoint now; its peer waits for it in the step
    # The time-limit warning's path: the batch script itself gets USR1 and passes it on.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job["id"]], check=True)
    deadline = time.time() + 60
    while "got USR1" not in log_text(job):
        assert time.time() < deadline, log_text(job)[-3000:]
        time.sleep(0.1)
    state = Path(f"/proc/{victim}/stat").read_text().rsplit(")", 1)[1].split()[0]
    assert state == "T", f"the stopped process was continued (state {state}): nothing tested"
    os.kill(victim, signal.SIGKILL)  # the crash, after the stop request
    runs = wait_done(job)
    text = log_text(job)
    assert runs == [("FAILED", "1:0")], f"{runs}\n{text[-3000:]}"  # one attempt: not requeued
    assert "did not checkpoint and exit with status 75" in text
    assert "not requeued" in text and "requeueing" not in text


def test_preempted_job_checkpoints_requeues_and_resumes(jobs):
    job = jobs["preempt"]
    # Preempt once training is under way: every process of the job step gets SIGUSR1.
    deadline = time.time() + 180
    while time.time() < deadline:
        logged = losses(job["run"]) if (job["run"] / "metrics.jsonl").is_file() else {}
        if len(logged) >= 10:
            break
        runs = attempts(job["id"])  # empty until accounting has heard of the job
        assert not (runs and runs[-1][0].startswith(TERMINAL)), log_text(job)[-3000:]
        time.sleep(0.2)
    else:
        pytest.fail(f"job {job['id']} logged no 10 steps in 180 s\n{log_text(job)[-3000:]}")
    signalled_at = max(logged)
    subprocess.run(["scancel", "--signal=USR1", job["id"]], check=True)
    runs = wait_done(job)
    assert runs == [("REQUEUED", "0:0"), ("COMPLETED", "0:0")], log_text(job)[-3000:]
    text = log_text(job)
    assert "attempt 2" in text and "requeueing job" in text
    assert "training stopped (status 75)" in text  # every process checkpointed and exited with 75
    stopped = assert_resumed_without_loss(job, STEPS["preempt"], signalled_at)
    assert stopped[0] < STEPS["preempt"], "the signal came too late to test preemption"
    # The requeued attempt continued the same W&B run: the id saved in the checkpoint was reused.
    ids = re.findall(r"W&B run (\w+) \(offline\)", text)
    assert len(ids) == 2 and ids[0] == ids[1], ids
    assert all(p.name.endswith(ids[0]) for p in (job["run"] / "wandb").glob("offline-run-*"))


def test_job_past_its_time_limit_is_warned_requeued_and_resumes(jobs):
    job = jobs["timelimit"]
    runs = wait_done(job, timeout=300)
    text = log_text(job)
    # SLURM's --signal=B:USR1 warning reached the batch script before the limit: the first attempt
    # checkpointed and was requeued (not TIMEOUT); the second, given a longer limit, finished.
    assert runs == [("REQUEUED", "0:0"), ("COMPLETED", "0:0")], f"{runs}\n{text[-3000:]}"
    assert text.count("got USR1") == 1
    assert "training stopped (status 75)" in text
    assert_resumed_without_loss(job, STEPS["timelimit"])


def test_job_completes(jobs):
    job = jobs["complete"]
    assert wait_done(job) == [("COMPLETED", "0:0")], log_text(job)[-3000:]
    assert sorted(losses(job["run"])) == list(range(1, STEPS["complete"] + 1))  # the configured steps
    assert "training finished" in log_text(job)


def test_bad_config_fails_without_requeue(jobs):
    job = jobs["bad"]
    assert wait_done(job) == [("FAILED", "1:0")]  # one attempt: not requeued
    text = log_text(job)
    assert "error (rank 0): global_batch_size=5 must be divisible" in text
    assert "not requeued" in text and "requeueing" not in text
