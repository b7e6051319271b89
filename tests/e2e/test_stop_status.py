"""The stop status, which tells a SLURM batch script "requeue me" (75) from "I failed" (anything else):
launch/pretrain.py exits 75 after its stop checkpoint (SIGUSR1, SIGTERM or Ctrl-C), and
launch/slurm/torchrun.py exits 75 only when every one of its workers did so, not when one crashed while
the others stopped."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, TINY, children, env, losses, pretrain_cmd, tiny_data, workers

EXIT_STOPPED = 75  # the status the README promises; not imported, so a changed constant fails here
ARGS = [*TINY, "global_batch_size=4", "micro_batch_size=2", "steps=500", "checkpoint.interval=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory)


def start(cmd: list[str], run: Path, *overrides: str) -> subprocess.Popen:
    """Start cmd + launch/pretrain.py on the tiny model; output goes to run/../out.txt (no pipe to fill)."""
    out = open(run.parent / "out.txt", "w")
    return subprocess.Popen([*cmd, str(REPO / "launch" / "pretrain.py"), "+conf=debug", f"hydra.run.dir={run}",
                             *ARGS, *overrides], cwd=run.parent, env=env(), stdout=out, stderr=subprocess.STDOUT)


def wait_for_a_step(proc: subprocess.Popen, run: Path) -> None:
    deadline = time.time() + 300
    while not ((run / "metrics.jsonl").is_file() and losses(run)):
        assert proc.poll() is None, f"exited with {proc.returncode} before its first step:\n{output(run)[-3000:]}"
        assert time.time() < deadline, "no step after 300 s"
        time.sleep(0.05)


def finish(proc: subprocess.Popen, run: Path) -> tuple[int, str]:
    proc.wait(timeout=300)
    return proc.returncode, output(run)


def output(run: Path) -> str:
    return (run.parent / "out.txt").read_text()


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, str(REPO / "launch" / "slurm" / "torchrun.py"), "--standalone",
            f"--nproc_per_node={nproc}"]


def assert_checkpointed_where_stopped(run: Path, ranks: int) -> None:
    stopped_at = max(losses(run))
    assert stopped_at < 500, "the signal came too late to test stopping"
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at:08d}"
    for rank in range(ranks):  # each rank took part in the stop checkpoint
        log = (run / "logs" / f"rank{rank}.log").read_text()
        assert f"checkpointing at step {stopped_at} and exiting" in log, f"rank {rank}:\n{log[-2000:]}"


def test_a_single_process_exits_with_the_stop_status(tmp_path, data):
    run = tmp_path / "run"
    proc = start([sys.executable], run, *data)  # no torchrun: launch/pretrain.py's own exit status
    wait_for_a_step(proc, run)
    proc.send_signal(signal.SIGUSR1)
    status, out = finish(proc, run)
    assert status == EXIT_STOPPED, out[-3000:]
    assert_checkpointed_where_stopped(run, ranks=1)


def test_wrapper_exits_with_the_stop_status_when_every_worker_stopped(tmp_path, data):
    run = tmp_path / "run"
    proc = start(torchrun(2), run, *data)
    wait_for_a_step(proc, run)
    proc.send_signal(signal.SIGUSR1)  # what SLURM or the batch script sends; the wrapper forwards it
    status, out = finish(proc, run)
    assert status == EXIT_STOPPED, out[-3000:]
    assert_checkpointed_where_stopped(run, ranks=2)
    assert "did not checkpoint" not in out and "failed (exitcode: 75)" not in out, out[-3000:]
    assert out.strip().splitlines()[-1] == ("[slurm/torchrun] every worker checkpointed and stopped: exiting 75; the "
                                            "same command resumes"), out[-3000:]


def test_ctrl_c_stops_every_worker_with_a_checkpoint_and_the_stop_status(tmp_path, data):
    """Ctrl-C reaches the agent alone (torchrun starts its workers in sessions of their own), and torchrun
    passes it on as SIGINT: a stop request like SIGUSR1, not a KeyboardInterrupt traceback per rank."""
    run = tmp_path / "run"
    proc = start(torchrun(2), run, *data)
    wait_for_a_step(proc, run)
    proc.send_signal(signal.SIGINT)
    status, out = finish(proc, run)
    assert status == EXIT_STOPPED, out[-3000:]  # so every worker left its marker, just before exiting 75
    assert_checkpointed_where_stopped(run, ranks=2)
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]


def test_sigterm_to_the_launcher_after_its_console_went_away_stops_with_the_stop_status(tmp_path, data):
    """The README's launcher under `... 2>&1 | tee log`, and tee ends (a Ctrl-C in that terminal ends it too): a
    SIGTERM still gives the stop checkpoint and status 75. The agent's own lines would otherwise raise
    BrokenPipeError into torchrun, which then exits 1 and SIGTERMs its workers."""
    run = tmp_path / "run"
    proc = subprocess.Popen([*torchrun(2), str(REPO / "launch" / "pretrain.py"), "+conf=debug", f"hydra.run.dir={run}",
                             *ARGS, *data], cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not ((run / "metrics.jsonl").is_file() and losses(run)):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-3000:]
        time.sleep(0.05)
    proc.stdout.close()  # the pipe has no reader now
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == EXIT_STOPPED
    assert_checkpointed_where_stopped(run, ranks=2)


def test_wrapper_exits_1_when_a_worker_dies_instead_of_stopping(tmp_path, data):
    run = tmp_path / "run"
    proc = start(torchrun(2), run, *data)
    wait_for_a_step(proc, run)
    victim = children(proc.pid)[0]
    environ = Path(f"/proc/{victim}/environ").read_bytes().split(b"\0")
    local_rank = next(v.decode().removeprefix("LOCAL_RANK=") for v in environ if v.startswith(b"LOCAL_RANK="))
    proc.send_signal(signal.SIGUSR1)
    os.kill(victim, signal.SIGKILL)  # a crash during the stop: no checkpoint from this rank
    status, out = finish(proc, run)
    assert status == 1, out[-3000:]  # a failure: the batch script must not requeue it
    line = next((ln for ln in out.splitlines() if "did not checkpoint and exit with status 75" in ln), "")
    assert line.startswith("[slurm/torchrun] stop requested, but ") and f"local rank {local_rank}" in line, out[-3000:]


def blocks_sigusr1(pid: int) -> bool:
    """Whether pid's main thread blocks SIGUSR1 (/proc/PID/status SigBlk, a hex mask with bit signum-1)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:"))
    return bool(int(mask, 16) >> (signal.SIGUSR1 - 1) & 1)


def test_a_stop_request_during_start_up_waits_for_the_processes(tmp_path, data):
    """SLURM can signal at any moment, start-up included, and `scancel --signal` reaches every process of
    the job step: the agent while it imports torch, the workers while they import theirs. Its default
    action would kill them; instead the request waits and they stop after their first step."""
    run = tmp_path / "run"
    proc = start(torchrun(2), run, *data)
    deadline = time.time() + 60
    while not blocks_sigusr1(proc.pid):  # the agent's first act; kills before it are unavoidable
        assert proc.poll() is None and time.time() < deadline, output(run)[-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)  # before the workers exist (the agent is still importing torch)
    told = set()
    while len(told) < 2 and proc.poll() is None:
        for pid in set(children(proc.pid)) - told:
            os.kill(pid, signal.SIGUSR1)  # as scancel --signal=USR1 does, while the worker starts up
            told.add(pid)
        time.sleep(0.01)
    assert not (run / "metrics.jsonl").exists(), "a step ran before the signals: not a start-up test"
    status, out = finish(proc, run)
    assert status == EXIT_STOPPED, out[-3000:]
    assert max(losses(run)) == 1  # stopped after the first step
    assert_checkpointed_where_stopped(run, ranks=2)


def running(pid: int) -> bool:
    """Whether pid is a live process (an orphan that ended may stay a zombie until init reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_torchrun_group(cmd: list[str], run: Path, ready) -> tuple[dict[int, int], float]:
    """Start cmd in a process group of its own, SIGKILL that group once ready() holds (as a harness or a user
    ending a stuck job does: torchrun's workers are in sessions of their own); returns the workers (pid by rank)
    and the seconds until none of them was left."""
    out = open(run.parent / "out.txt", "a")
    proc = subprocess.Popen(cmd, cwd=run.parent, env=env(), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (ready() and workers(proc.pid)):
        assert proc.poll() is None and time.time() < deadline, output(run)[-3000:]
        time.sleep(0.05)
    ranks = workers(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = time.time()
    while any(running(pid) for pid in ranks.values()) and time.time() < killed + 30:
        time.sleep(0.1)
    gone_after = time.time() - killed
    for pid in ranks.values():
        if running(pid):
            os.kill(pid, signal.SIGKILL)  # the old behaviour: orphans training on
    return ranks, gone_after


def test_workers_end_when_torchrun_is_killed_and_the_same_command_resumes(tmp_path, data):
    """kill -9 of plain torchrun's process group after the first checkpoint: no worker trains on as an orphan
    (holding the run folder's lock), it says why in its log, and the same command resumes from the checkpoint.
    One worker: each watches its own launcher, so two would only double the cost."""
    run = tmp_path / "run"
    cmd = pretrain_cmd(1, run, *[a for a in ARGS if a != "checkpoint.interval=0"], "checkpoint.interval=2", *data)
    _, gone_after = kill_torchrun_group(cmd, run, lambda: (run / "checkpoints" / "latest").is_file())
    assert gone_after < 5, f"the workers trained on {gone_after:.0f} s after torchrun was killed"
    log = (run / "logs" / "rank0.log").read_text()
    assert "the launcher (torchrun, pid" in log and "is gone: exiting without a checkpoint" in log, log[-2000:]
    saved = (run / "checkpoints" / "latest").read_text().strip()
    resumed = f"resumed from {run / 'checkpoints' / saved}"
    kill_torchrun_group(cmd, run, lambda: resumed in (run / "logs" / "rank0.log").read_text())  # not locked out
