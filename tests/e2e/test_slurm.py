"""launch/slurm/pretrain.sbatch on one real SLURM node: a run completes; a bad config fails without a
requeue, and so does a run whose process crashes during a stop. (Preemption, time limits and lost nodes:
tests/e2e/test_slurm_multinode.py.)

Needs a running SLURM with accounting (CI starts one with ../shared/slurm/start_local_slurm.sh, see
.ci/run); without one these tests skip and say why. The jobs run at the same time."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, TINY, env, losses, tiny_data
from slurm_cluster import job_workers, log_text, one_node_opts, require_slurm, wait_done, wait_for_steps

B = 4  # global batch
BASE = [*TINY, f"global_batch_size={B}", "micro_batch_size=2", "checkpoint.interval=0",
        "stability.spike_z=0"]  # no loss-spike rollbacks: they skip data on purpose
STEPS = {"complete": 20, "crash": 5000}  # crash: its test stops it


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    require_slurm()
    data = tiny_data(tmp_path_factory)
    root = tmp_path_factory.mktemp("slurm")
    specs = {"bad": ["global_batch_size=5"], "crash": [f"steps={STEPS['crash']}"],  # name: overrides
             "complete": [f"steps={STEPS['complete']}"]}
    job_env = {**env(), "NPROC_PER_NODE": "2", "PYTHON": sys.executable}
    out = {}
    for name, overrides in specs.items():
        run, log = root / name, root / f"{name}.out"
        cmd = ["sbatch", "--parsable", f"--job-name={name}", "--cpus-per-task=1", f"--output={log}", *one_node_opts(),
               str(REPO / "launch" / "slurm" / "pretrain.sbatch"), "+conf=debug", f"hydra.run.dir={run}",
               *BASE, *data, *overrides]
        proc = subprocess.run(cmd, cwd=REPO, env=job_env, capture_output=True, text=True, check=True)
        out[name] = {"id": proc.stdout.strip().split(";")[0], "run": run, "log": log}
    yield out
    subprocess.run(["scancel", *(j["id"] for j in out.values())], capture_output=True)


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
