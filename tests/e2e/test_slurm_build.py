"""launch/slurm/build_shards.sbatch on a real SLURM: an array of 4 tasks builds one shard set byte for byte equal to a
one-machine build (the last task to finish merges); a rerun of the array does nothing; an array short of a task
builds no set, a rerun of it skips every part built, and the missing task alone then builds its part and merges.
Tiny inputs: seconds a task.

Needs a running SLURM with accounting (CI starts one, see .ci/run); without one these tests skip and say why."""

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, assert_same_shard_set, env
from slurm_cluster import TERMINAL, one_node_opts, require_slurm, sbatch

from data_pipeline.build import build_shards
from data_pipeline.sample_corpus import sample_corpus_dir
from data_pipeline.tokenizer import train_tokenizer

SETTINGS = ["txt_mode=paragraph", "val_fraction=0.1", "shard_tokens=5000"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four plays, a 512-piece tokenizer, a one-machine build of them; the jobs are cancelled at the end."""
    require_slurm()
    root = tmp_path_factory.mktemp("slurm_build")
    plays = root / "plays"
    plays.mkdir()
    for p in sorted(sample_corpus_dir().glob("*.txt"))[:4]:
        shutil.copy(p, plays / p.name)
    tok = train_tokenizer([str(plays)], root / "tok.model", vocab_size=512)
    reference = root / "reference"
    build_shards([str(plays)], reference, tok, txt_mode="paragraph", val_fraction=0.1, shard_tokens=5000,
                 num_proc=1, progress=False)
    jobs = []
    yield {"root": root, "args": [f"inputs=[{plays}]", f"tokenizer={tok.path}", *SETTINGS], "reference": reference,
           "jobs": jobs}
    subprocess.run(["scancel", *jobs], capture_output=True)  # none left running after a failure


def submit(data, name: str, array: str, *args: str) -> dict:
    """Submit the array with the data's inputs and args; its tasks' logs are root/<name>-<job id>_<task>.out."""
    job_env = {**env(), "PYTHON": sys.executable}
    job_id = sbatch(f"--array={array}", "--cpus-per-task=1", f"--job-name={name}", *one_node_opts(),
                    f"--output={data['root'] / name}-%A_%a.out", "launch/slurm/build_shards.sbatch", *data["args"],
                    *args, cwd=REPO, env=job_env)
    data["jobs"].append(job_id)
    first, _, last = array.partition("-")
    return {"id": job_id, "name": name, "tasks": range(int(first), int(last or first) + 1)}


def states(job_id: str) -> dict[int, str]:
    """Each array task's state by task id, from accounting (sacct -X: a line per task once it is scheduled; until
    then one line for the tasks still pending, 12_[1-3], and maybe the array's own id, 12: neither names a task)."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State"], capture_output=True,
                         text=True, check=True).stdout
    rows = [(re.fullmatch(r"\d+_(\d+)", line.split("|")[0]), line.split("|")[1]) for line in out.splitlines() if line]
    return {int(task[1]): state for task, state in rows if task}


def wait_all(job: dict, timeout: float = 240) -> set[str]:
    """Until every task of the array has ended, not just the last one; the set of their states."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = states(job["id"])
        if sorted(found) == list(job["tasks"]) and all(s.startswith(TERMINAL) for s in found.values()):
            return set(found.values())
        time.sleep(0.5)
    pytest.fail(f"array {job['id']} not done after {timeout} s: {states(job['id'])}")


def logs(data, job: dict) -> dict[int, str]:
    """Each task's log by task id."""
    files = Path(data["root"]).glob(f"{job['name']}-{job['id']}_*.out")
    return {int(f.stem.rsplit("_", 1)[1]): f.read_text() for f in files}


def test_array_builds_the_one_machine_set_and_a_rerun_skips_every_part(data):
    out = data["root"] / "full"
    short_out = data["root"] / "short"
    full = submit(data, "full", "0-3", f"out_dir={out}")
    short = submit(data, "short", "0-2", f"out_dir={short_out}", "parts=4")  # one task short: part 3 never built
    bad = submit(data, "bad", "1-2", f"out_dir={data['root'] / 'bad'}")  # not 0..N-1, and no parts=

    assert wait_all(full) == {"COMPLETED"}, logs(data, full)
    text = logs(data, full)
    assert all(f"part {k} of 4 built" in text[k] for k in range(4)), text
    assert sum("merged 4 parts" in t for t in text.values()) == 1, text
    assert_same_shard_set(out, data["reference"])
    assert not (data["root"] / ".full.partial").exists()

    assert wait_all(short) == {"COMPLETED"}, logs(data, short)
    assert not short_out.exists() and all("waiting for part" in t for t in logs(data, short).values())
    assert wait_all(bad) == {"FAILED"}
    assert all("pass parts=N" in t for t in logs(data, bad).values()), logs(data, bad)

    stamp = (out / "manifest.json").stat().st_mtime_ns
    rerun = submit(data, "rerun", "0-3", f"out_dir={out}")  # the same command again: nothing left to do
    short_rerun = submit(data, "shortrerun", "0-2", f"out_dir={short_out}", "parts=4")  # every part skipped
    assert wait_all(rerun) == {"COMPLETED"}, logs(data, rerun)
    text = logs(data, rerun)
    assert all(f"part {k} of 4: {out} already holds this build; nothing to do" in text[k] for k in range(4)), text
    assert (out / "manifest.json").stat().st_mtime_ns == stamp

    assert wait_all(short_rerun) == {"COMPLETED"}, logs(data, short_rerun)
    text = logs(data, short_rerun)
    assert all(f"part {k} of 4 already built: skipped" in text[k] for k in range(3)), text
    assert not short_out.exists()
    last = submit(data, "last", "3", f"out_dir={short_out}", "parts=4")  # the missing task alone, as the log says
    assert wait_all(last) == {"COMPLETED"}, logs(data, last)
    assert "part 3 of 4 built" in logs(data, last)[3] and "merged 4 parts" in logs(data, last)[3]
    assert_same_shard_set(short_out, data["reference"])
