"""benchmarks/gpu_check.py's control flow on the CPU (--dry-run: the debug model, no torchtitan), so that the
scarce GPU minutes go to measuring: rows in order, each appended as it ends, comparisons, the profile."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys

import pytest
from helpers import REPO, env, tiny_data

GPU_CHECK = REPO / "benchmarks" / "gpu_check.py"  # a developer tool, not in the installed package: loaded by path
_spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """A kit as `prepare` lays it out, made of the suite's tiny tokenizer and shards."""
    overrides = dict(o.split("=", 1) for o in tiny_data(tmp_path_factory))
    kit = tmp_path_factory.mktemp("kit")
    shutil.copy(overrides["data.tokenizer"], kit / "tokenizer.model")
    shutil.copytree(overrides["data.shards"].strip("[]"), kit / "shards")
    return kit


def check(*args):
    return subprocess.run([sys.executable, str(GPU_CHECK), *map(str, args)],
                          capture_output=True, text=True, env=env(), timeout=600)


def test_dry_run_measures_rows_in_order_and_compares_them(kit, tmp_path):
    out = tmp_path / "out"
    proc = check("run", kit, out, "--dry-run", "--rows", "1B 2x8192,1B 2x8192 document masking,1B 2x8192 cpu_offload")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["row"] for r in records] == ["1B 2x8192", "1B 2x8192 document masking", "1B 2x8192 cpu_offload"]
    causal, masked, offloaded = (r["ours"] for r in records)
    for figs in (causal, masked, offloaded):
        assert figs["tokens_per_s"] > 0 and figs["peak_mem_gib"] > 0, figs
    assert records[0]["torchtitan"] == {"skipped": "dry run"}
    assert records[1]["ratio"] == f"{masked['tokens_per_s'] / causal['tokens_per_s']:.3f}x vs 1B 2x8192"
    assert records[2]["ratio"] == f"{offloaded['tokens_per_s'] / causal['tokens_per_s']:.3f}x vs 1B 2x8192"
    offload_row = next(row for row in gpu_check.ROWS if row.name == "1B 2x8192 cpu_offload")
    assert "parallel.cpu_offload=true" in gpu_check.ours_cmd(offload_row, kit, tmp_path, dry=True)
    table = (out / "results.md").read_text()
    assert table.startswith("# GPU check: CPU") and all(f"| {r['row']} |" in table for r in records)
    assert (out / "logs" / "ours_1B_2x8192.log").is_file()

    # The last step ran under the profiler: a split by kind of kernel whose shares make the whole.
    summary = (out / "profile_1B_2x8192.txt").read_text()
    total_ms = float(re.match(r"step (\d+): CPU operator self time ([\d.]+) ms", summary)[2])
    kinds = re.findall(r"^(\S[^\n]*?)\s+([\d.]+)\s+([\d.]+)%$", summary.split("\n\n")[1], re.M)
    assert total_ms > 0 and {k for k, _, _ in kinds} >= {"matmul", "attention", "optimizer"}
    assert sum(float(ms) for _, ms, _ in kinds) == pytest.approx(total_ms, abs=0.05 * len(kinds))


def test_rows_that_no_longer_fit_are_skipped_and_said_so():
    row = gpu_check.ROWS[0]
    assert gpu_check.skip_reason(row, row.needs_s + 1, torchao=True) == ""
    assert "needs about" in gpu_check.skip_reason(row, row.needs_s - 1, torchao=True)
    float8 = next(r for r in gpu_check.ROWS if r.float8 != "none")
    assert gpu_check.skip_reason(float8, 10**4, torchao=False) == "torchao is not installed"


def test_torchtitan_line_and_failures_become_figures():
    line = "TORCHTITAN flavor=1B batch=2 seq=8192 tps=48392 tflops=514.2 mfu=52.0% mem_gib=50.7"  # tt_bench.sh's
    assert gpu_check.figures(line) == {"tokens_per_s": 48392, "tflops": 514.2, "mfu": 52.0, "peak_mem_gib": 50.7}
    assert gpu_check.figures("TORCHTITAN flavor=1B FAILED rc=1; see x.log") == {
        "error": "TORCHTITAN flavor=1B FAILED rc=1; see x.log"}


@pytest.mark.parametrize("args, message", [
    (("run", "{empty}", "{out}", "--dry-run"), "holds no tokenizer or no shards: run "
                                               "`python benchmarks/gpu_check.py prepare"),
    (("run", "{kit}", "{out}", "--dry-run", "--rows", "2B"), "--rows names '2B', which is none of: 1B 2x8192,"),
])
def test_bad_input_is_one_line(kit, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    paths = {"empty": tmp_path / "empty", "out": tmp_path / "out", "kit": kit}
    proc = check(*(a.format(**paths) for a in args))
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
