"""Throughput benchmark through the real trainer (model, loader over real shards, AdamW step):
`torchrun --nproc_per_node=1 benchmarks/bench.py +conf=bench_1b data.tokenizer=... data.shards=[...]`.

Runs the configured steps with log_interval=1 and prints one machine-readable line, medians over
the steps after `warmup` (compilation and allocator warm-up excluded):
BENCH preset=.. batch=.. seq=.. tokens_per_s=.. tflops=.. mfu=.. peak_mem_gib=.. steps=..

It imports the project: installed (scripts/install.sh), or the checkout on PYTHONPATH, as benchmarks/gpu_check.py
and benchmarks/bench_vs_torchtitan.sh run it on a GPU machine that has only the checkout.
"""

import json
import shutil
import statistics
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from launch.cli_args import RUN_ERRORS, fail
from train import config

config.register()
WARMUP = 10


def summarize(metrics_file: Path, cfg) -> str:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    # A profiled step (profile_step=N) runs slower: it is left out of the medians.
    rows = [r for r in rows if "tokens_per_s" in r and r["step"] > WARMUP and r["step"] != cfg.profile_step]
    if not rows:
        return f"BENCH preset={cfg.model.preset} FAILED: no steps after warm-up {WARMUP}"

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    mfu = f"{100 * med('mfu'):.1f}%" if "mfu" in rows[0] else "n/a"
    return (f"BENCH preset={cfg.model.preset} batch={cfg.micro_batch_size} seq={cfg.data.seq_len} "
            f"ac={cfg.parallel.activation_checkpointing} compile={cfg.parallel.compile} float8={cfg.parallel.float8} "
            f"tokens_per_s={med('tokens_per_s_per_device'):.0f} tflops={med('tflops_per_device'):.1f} mfu={mfu} "
            f"peak_mem_gib={max(r['peak_memory_gib'] for r in rows):.1f} steps={len(rows)}")


MARKER = ".benchmark"  # in every folder a benchmark ran in: only such a folder is cleared for the next one


def fresh_bench_folder(run_dir: Path) -> None:
    """A benchmark starts from scratch, so it clears its folder, but only a folder it made: the run
    folder of a real run (same run_name) is refused, not deleted. Rank 0 only, before any rank writes."""
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / MARKER).is_file():
        fail(f"{run_dir} holds a run that is not a benchmark's: a benchmark starts from scratch and would delete "
             f"it; give the benchmark its own folder (run_name=... or hydra.run.dir=...)")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    (run_dir / MARKER).write_text("written by benchmarks/bench.py; the next benchmark here deletes this folder\n")


@hydra.main(config_path="..", config_name="pretrain", version_base="1.3")
def main(cfg) -> None:
    import os

    from train.loop.job import run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if os.environ.get("RANK", "0") == "0":
        fresh_bench_folder(run_dir)  # the other ranks write nothing before rank 0 joins the process group
    typed = OmegaConf.to_object(cfg)
    try:
        run(typed, run_dir)
    except RUN_ERRORS as e:
        fail(str(e))
    if os.environ.get("RANK", "0") == "0":
        print(summarize(run_dir / "metrics.jsonl", typed), flush=True)


if __name__ == "__main__":
    problem = config.check_overrides(sys.argv[1:], Path(__file__).resolve().parent.parent / "conf")
    if problem:
        fail(problem)
    main()
