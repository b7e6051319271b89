"""benchmarks/bench.py through torchrun on CPU: the BENCH line's figures against a clock outside the trainer and
the machine, and one-line errors."""

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, TINY, env, tiny_data, without_torchrun_summary

WARMUP = 10  # bench.py reports medians over the steps after the first 10 (README: "steps 11-30")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory)


def bench(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, dict[int, float]]:
    """Run benchmarks/bench.py on one rank; also returns when each step's metrics.jsonl record appeared, by
    this process's clock (polled every millisecond), an outside measure of how long each step took."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(REPO / "benchmarks" / "bench.py"), "+conf=debug", f"hydra.run.dir={run}", *TINY, *overrides]
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=stdout, stderr=stderr)
        seen = watch_steps(proc, run / "metrics.jsonl", deadline=time.time() + 300)
    done = subprocess.CompletedProcess(cmd, proc.returncode, out.read_text(), err.read_text())
    return done, seen


def watch_steps(proc: subprocess.Popen, metrics: Path, deadline: float) -> dict[int, float]:
    """Step -> time.perf_counter() when its training record was first seen in metrics, until proc ends."""
    seen, done, pending = {}, 0, b""
    while proc.poll() is None and time.time() < deadline:
        new = metrics.read_bytes()[done:] if metrics.is_file() else b""
        now = time.perf_counter()
        done += len(new)
        *lines, pending = (pending + new).split(b"\n")
        for row in map(json.loads, lines):
            if "tokens_per_s" in row:
                seen.setdefault(row["step"], now)
        time.sleep(0.001)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    return seen


def bench_fields(proc: subprocess.CompletedProcess) -> dict[str, str]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
    assert len(line) == 1, proc.stdout[-2000:]
    return dict(re.findall(r"(\w+)=(\S+)", line[0]))


def test_bench_figures_agree_with_the_clock_and_the_machine(tmp_path, data):
    """tokens/s is tokens per step over the median step time (2 micro-batches of 2 x 64 per step here), the
    steps are the ones after warm-up, and peak memory lies between the training state and the machine's RAM."""
    steps, micro, batch, seq = 15, 2, 4, 64
    proc, seen = bench(tmp_path, *data, f"steps={steps}", f"micro_batch_size={micro}", f"global_batch_size={batch}",
                       f"data.seq_len={seq}")
    fields = bench_fields(proc)
    assert (fields["batch"], fields["seq"]) == (str(micro), str(seq))
    assert sorted(seen) == list(range(1, steps + 1))  # every step logged once (log_interval=1)
    assert int(fields["steps"]) == steps - WARMUP

    # The trainer times each step from the end of the last one; seen here, a step ends when its record
    # appears. The two differ by the record and log writes outside the trainer's window (well under 1 ms)
    # and this poll's latency (1 ms, more when the 2 cores are busy), against steps of tens of ms or more:
    # 10% (or 5 ms) holds them, and still catches a wrong token count, rank count or step range.
    step_s = statistics.median(seen[s] - seen[s - 1] for s in range(WARMUP + 1, steps + 1))
    assert batch * seq / float(fields["tokens_per_s"]) == pytest.approx(step_s, rel=0.10, abs=0.005)

    # fp32 weights, gradients and AdamW's two moments are all alive at a step's end: 16 bytes a parameter.
    from data_pipeline.tokenizer import Tokenizer
    from model import build_model, preset

    vocab = Tokenizer(next(o for o in data if o.startswith("data.tokenizer=")).split("=", 1)[1]).vocab_size
    model = build_model(preset("debug", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab))
    training_state = 16 * sum(p.numel() for p in model.parameters())
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert training_state < float(fields["peak_mem_gib"]) * 2**30 < machine


def test_bench_bad_value_is_one_line(tmp_path, data):
    proc, _ = bench(tmp_path, *data, "parallel.activation_checkpointing=some")
    err = without_torchrun_summary(proc.stderr)
    assert proc.returncode != 0
    assert "error (rank 0): parallel.activation_checkpointing='some'" in err and "Traceback" not in err, err[-3000:]


def test_bench_refuses_to_clear_a_real_run(tmp_path, data):
    """A benchmark clears its folder to start from scratch: never the folder of a run (same run_name)."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    proc, _ = bench(tmp_path, *data)
    err = without_torchrun_summary(proc.stderr)
    assert proc.returncode != 0 and f"{run} holds a run that is not a benchmark's" in err, err[-3000:]
    assert (run / "checkpoints" / "step_00000002").is_dir() and (run / "metrics.jsonl").is_file()
