"""Builds in parts (data_pipeline/parts.py, merge.py): N parts, each its own `python -m data_pipeline build ...
parts=N part=K` process, merge into the very bytes of a one-machine build; a one-machine build killed midway resumes
from the parts it had built; parts of other settings are never reused; wrong part arguments and a merge short of a
part fail in one line naming the fix. Real Shakespeare, a real SentencePiece tokenizer, no SLURM."""

import json
import logging
import math
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import assert_same_shard_set, env

from data_pipeline.build import build_shards
from data_pipeline.loader import ShardSet
from data_pipeline.sample_corpus import sample_corpus_dir
from data_pipeline.tokenizer import train_tokenizer

# paragraphs of 16 plays (2 MB): many documents, so parts cut anywhere; ~50 shards, many cut across parts
SETTINGS = ["txt_mode=paragraph", "val_fraction=0.1", "shard_tokens=20000", "num_proc=1"]
KW = {"txt_mode": "paragraph", "val_fraction": 0.1, "shard_tokens": 20_000, "num_proc": 1, "progress": False}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """16 plays of the sample corpus, a 512-piece tokenizer, and a one-machine build of them (one part)."""
    root = tmp_path_factory.mktemp("parts")
    plays = root / "plays"
    plays.mkdir()
    for p in sorted(sample_corpus_dir().glob("*.txt"))[:16]:
        shutil.copy(p, plays / p.name)
    tok = train_tokenizer([str(p) for p in sorted(plays.glob("*.txt"))[:2]], root / "tok.model", vocab_size=512)
    reference = root / "reference"
    build_shards([str(plays)], reference, tok, **{**KW, "num_proc": 2})  # the pool's path; the parts run in-process
    m = json.loads((reference / "manifest.json").read_text())
    assert len(m["splits"]["train"]["shards"]) > 30 and m["splits"]["val"]["shards"]  # worth comparing
    return {"root": root, "plays": str(plays), "tok": tok, "inputs": f"inputs=[{plays}]",
            "tokenizer": f"tokenizer={tok.path}", "reference": reference, "input_bytes": m["input_bytes"]}


def build_cmd(corpus, out, *args) -> list[str]:
    return [sys.executable, "-m", "data_pipeline", "build", corpus["inputs"], f"out_dir={out}", corpus["tokenizer"],
            *SETTINGS, *args]


def build(corpus, out, *args) -> subprocess.CompletedProcess:
    return subprocess.run(build_cmd(corpus, out, *args), capture_output=True, text=True, env=env(), timeout=300)


def start(corpus, out, *args) -> subprocess.Popen:
    return subprocess.Popen(build_cmd(corpus, out, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env())


def committed(out) -> list:
    """The parts of the build into out that are complete (their part.json written and renamed into place; a
    <part>.tmp folder holding one is not: it was killed before the rename)."""
    return sorted(out.parent.glob(f".{out.name}.partial/parts/*-of-[0-9][0-9][0-9][0-9][0-9]/part.json"))


def fingerprints(paths) -> set[str]:
    return {json.loads(p.read_text())["fingerprint"] for p in paths}


def assert_one_line_error(result, *needles):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_parts_built_apart_merge_to_the_one_machine_bytes(corpus, caplog):
    out = corpus["root"] / "parts3"
    # a part 0 of another build (seed 1) waits under the same name; it must not be taken for this build's
    assert build_shards([corpus["plays"]], out, corpus["tok"], **KW, seed=1, parts=3, part=0) is None
    with pytest.raises(ValueError, match="part 0 of 3 is from another build .*rerun array task 0"):
        build_shards([corpus["plays"]], out, corpus["tok"], **KW, parts=3)  # merge only
    # the three parts at once, as array tasks run: the last to commit merges, the others wait or find it done
    procs = [start(corpus, out, "parts=3", f"part={k}") for k in range(3)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e for _, e in outputs]
    for k, (stdout, _) in enumerate(outputs):
        assert f"part {k} of 3 built" in stdout  # part 0 too: the stale one was not reused
    assert sum("merged 3 parts" in stdout for stdout, _ in outputs) == 1
    assert_same_shard_set(out, corpus["reference"])
    assert not (corpus["root"] / ".parts3.partial").exists()  # the parts are gone once merged
    with caplog.at_level(logging.INFO, logger="data_pipeline"):  # a task rerun after the merge: nothing to do
        build_shards([corpus["plays"]], out, corpus["tok"], **KW, parts=3, part=1)
    assert "part 1 of 3: " in caplog.text and "already holds this build; nothing to do" in caplog.text
    # one machine, a pool of two, many parts: the jobs of one part follow another's in the pool without a pause
    many = corpus["root"] / "many"
    build_shards([corpus["plays"]], many, corpus["tok"], **{**KW, "num_proc": 2}, part_bytes=100_000)
    assert_same_shard_set(many, corpus["reference"])


class EndedFirst(Exception):
    """The build finished before a signal reached it: the test process stalled past the whole build."""


def signal_after_parts(proc, out, n: int, sig) -> str:
    """Send sig to the build into out once n of its parts are committed; its stdout once it has ended."""
    deadline = time.time() + 120
    while len(committed(out)) < n and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    if proc.poll() is not None:
        raise EndedFirst(proc.communicate())
    assert len(committed(out)) >= n
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    if proc.returncode == 0 and out.exists():  # also what a build deaf to the signal does: three tries fail the test
        raise EndedFirst((stdout, stderr))
    return stdout


def test_interrupted_one_machine_build_resumes_from_its_parts(corpus):
    out = corpus["root"] / "resumed"
    ended = []
    for _ in range(3):  # a build that ended before its signal (a loaded 2-core machine stalls the test) runs again
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.parent / f".{out.name}.partial", ignore_errors=True)
        try:
            return interrupted_build_resumes(corpus, out)
        except EndedFirst as e:
            ended.append(e)
    pytest.fail(f"the build ended before its signal three times: {ended}")


def interrupted_build_resumes(corpus, out):
    part_bytes = 40_000  # ~50 parts of the 2 MB: several a second
    small = f"part_bytes={part_bytes}"
    # a part of other settings under the name of this build's first, as a build with seed=1 killed midway leaves
    n_parts = math.ceil(corpus["input_bytes"] / part_bytes)
    build_shards([corpus["plays"]], out, corpus["tok"], **KW, seed=1, parts=n_parts, part=0)
    foreign = fingerprints(committed(out))
    assert len(foreign) == 1 and not out.exists()
    # Ctrl-C after two parts: the part being written goes, the finished ones stay
    proc = start(corpus, out, small)
    # the foreign part counts only until it is pruned, before this build's first
    stdout = signal_after_parts(proc, out, 2, signal.SIGINT)
    assert proc.returncode != 0 and "resuming" not in stdout  # the foreign part was not reused ...
    assert "removed 1 part(s) of another build" in stdout
    kept = committed(out)
    assert kept and not fingerprints(kept) & foreign  # ... but removed
    assert not list(out.parent.glob(f".{out.name}.partial/parts/*.tmp"))  # no half-written part
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.partial/set/manifest.json"))
    with pytest.raises(FileNotFoundError, match="manifest"):
        ShardSet.open(out)
    # SIGKILL after one more part: what it was writing stays, half-written, and is not taken for a part
    proc = start(corpus, out, small)
    signal_after_parts(proc, out, len(kept) + 1, signal.SIGKILL)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.partial/set/manifest.json"))
    done = len(committed(out))
    rerun = build(corpus, out, small)
    assert rerun.returncode == 0, rerun.stderr
    resumed = re.search(r"resuming: (\d+) of (\d+) parts already built", rerun.stdout)
    assert resumed and int(resumed[1]) == done and done < int(resumed[2]) == n_parts, rerun.stdout
    assert_same_shard_set(out, corpus["reference"])  # part_bytes, like parts, is not part of the fingerprint
    assert not (corpus["root"] / ".resumed.partial").exists()


def test_part_arguments_and_a_merge_short_of_a_part_fail_in_one_line(corpus):
    out = corpus["root"] / "errors"
    assert_one_line_error(build(corpus, out, "part=1"), "part=1 needs parts=N")
    assert_one_line_error(build(corpus, out, "parts=2"), "part 0 of 2 is missing", "rerun array task 0",
                          "sbatch --array=0", "parts=2 part=0")
    for wrong, message in (({"parts": 3, "part": 3}, "part=3 is not one of parts=3: parts are numbered 0 to 2"),
                           ({"parts": 0}, "parts=0 must be at least 1"),
                           ({"part_bytes": 0}, "part_bytes=0 must be positive")):
        with pytest.raises(ValueError, match=message):
            build_shards([corpus["plays"]], out, corpus["tok"], **KW, **wrong)
    assert not out.exists() and not (corpus["root"] / ".errors.partial").exists()
