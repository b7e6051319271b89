"""launch/bench.py through torchrun on CPU: the machine-readable BENCH line, and one-line errors."""

import re
import subprocess
import sys

import pytest

from helpers import REPO, TINY, env, tiny_data, without_torchrun_summary


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory)


def bench(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(REPO / "launch" / "bench.py"), "+conf=debug", f"hydra.run.dir={tmp_path / 'run'}", *TINY, *overrides]
    return subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)


def test_bench_prints_medians_of_the_steps_after_warmup(tmp_path, data):
    proc = bench(tmp_path, *data, "steps=13", "micro_batch_size=2", "global_batch_size=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
    assert len(line) == 1, proc.stdout[-2000:]
    fields = dict(re.findall(r"(\w+)=(\S+)", line[0]))
    assert fields["batch"] == "2" and fields["seq"] == "64" and fields["steps"] == "3"  # steps 11-13
    assert float(fields["tokens_per_s"]) > 0 and float(fields["peak_mem_gib"]) > 0


def test_bench_bad_value_is_one_line(tmp_path, data):
    proc = bench(tmp_path, *data, "parallel.activation_checkpointing=some")
    err = without_torchrun_summary(proc.stderr)
    assert proc.returncode != 0
    assert "error (rank 0): parallel.activation_checkpointing='some'" in err and "Traceback" not in err, err[-3000:]
