"""Each rank's measured peak memory in real multi-rank training steps against the planner's estimate for that rank
(train/parallel/memory_gate.py rank_estimate, from train/planner/memory.py), on the CPU over gloo:

    python benchmarks/memory_check.py dp2 tp2 pp2 cp2 dp2tp2 --ac none full
    torchrun --nproc_per_node=2 benchmarks/memory_check.py --worker dp2 tp2 pp2   # one world size, no table

The model is built and stepped as the trainer does: train/loop/step.py build_runner (build_parallel_model:
meta device, pipeline split, parallelize's TP, AC and FSDP2), train/optim.py's fused AdamW, forward_backward over
the micro-batches, reduce_step, the optimizer step and zero_grad(set_to_none=True), a few steps.

Measurement: torch.profiler with profile_memory=True records every allocation and free of c10's CPU allocator
(c10/core/CPUAllocator.cpp ProfiledCPUMemoryReporter, the hook that feeds the profiler) with the running total of
live bytes; the peak of that total over the steps is the rank's peak of live tensor bytes, every tensor
whatever made it (FSDP's gathered and reduce buffers, autograd's saved tensors, the optimizer's state, gloo's
flattened collective buffers) and none of what is not a tensor (Python objects, gloo's own transport buffers).
tracemalloc sees no torch tensor; a TorchDispatchMode counter sees only op outputs, not FSDP's and c10d's buffers
nor kernels' workspaces. The CPU runs in fp32 with no caching allocator, so what is checked is allocated bytes,
the quantity the estimate models (reserved bytes, CUDA's caching allocator: train/planner/memory.py
reserved_bytes).

A worker's rank 0 prints one line per rank and case, `MEM {json}`; the launcher gathers them into the table.
"""

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout without the package installed

from model import ModelConfig  # noqa: E402
from train.config import BatchShape, OptimSection, ParallelSection  # noqa: E402
from train.loop.step import build_runner, labelled_tokens, reduce_step  # noqa: E402
from train.optim import build_optimizer  # noqa: E402
from train.parallel.distributed import init_distributed  # noqa: E402
from train.parallel.memory_gate import rank_estimate  # noqa: E402

# layout key -> (ranks, tp, pp, cp); dp_shard is what is left of the ranks.
LAYOUTS = {"dp2": (2, 1, 1, 1), "tp2": (2, 2, 1, 1), "pp2": (2, 1, 2, 1), "cp2": (2, 1, 1, 2), "dp2tp2": (4, 2, 1, 1)}
MiB = 2**20


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("layouts", nargs="+", choices=sorted(LAYOUTS))
    ap.add_argument("--ac", nargs="+", default=["none", "full"], choices=["none", "selective", "full"])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--micro", type=int, default=2, help="micro_batch_size")
    ap.add_argument("--microbatches", type=int, default=1,
                    help="micro-batches per data-parallel rank and step (accumulation; pp: at least pp)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help="run under torchrun: measure, print MEM lines")
    return ap.parse_args(argv)


def model_config(args) -> ModelConfig:
    return ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads // 2,
                       vocab_size=args.vocab, max_seq_len=args.seq)


def count_every_thread() -> None:
    """Have c10's CPU allocator keep its count of live bytes over every thread (c10/core/CPUAllocator.cpp,
    FLAGS_caffe2_report_cpu_memory_usage). Without it only the profiled thread's allocations and frees are counted,
    and a tensor whose last reference a gloo worker thread drops (a finished collective's) stays counted, a
    different amount on each rank. The profiler's events then carry that process-wide count."""
    libc10 = Path(torch.__file__).parent / "lib" / "libc10.so"
    ctypes.c_bool.in_dll(ctypes.CDLL(str(libc10)), "FLAGS_caffe2_report_cpu_memory_usage").value = True


def live_bytes(prof, marker: str) -> tuple[int, int, int]:
    """(live bytes when marker's range ends, peak live bytes after it, live bytes at the end), counted from the
    session's start, from the profiler's allocation events (each carries the allocator's count of live bytes)."""
    from torch._C._profiler import _EventType

    def walk(events):
        for e in events:
            yield e
            yield from walk(e.children)

    events = list(walk(prof.profiler.kineto_results.experimental_event_tree()))
    marker_end = max(e.end_time_ns for e in events if e.tag == _EventType.TorchOp and e.name == marker)
    allocs = sorted((e.start_time_ns, e.extra_fields) for e in events
                    if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu")
    base = allocs[0][1].total_allocated - allocs[0][1].alloc_size
    at_marker = [f.total_allocated for t, f in allocs if t <= marker_end][-1]
    peak = max(f.total_allocated for t, f in allocs if t > marker_end)
    return at_marker - base, peak - base, allocs[-1][1].total_allocated - base


def microbatches(args, pp: int) -> int:
    """Micro-batches per data-parallel rank and step: as asked, and at least pp (1F1B's fill)."""
    return max(args.microbatches, pp)


def rank_batch(args, env, step: int) -> dict:
    """This data-parallel rank's rows of the step (the loader's share: global batch / dp ranks)."""
    rows = args.micro * microbatches(args, env.pp)
    g = torch.Generator().manual_seed(1000 * step + env.dp_rank)
    tokens = torch.randint(0, args.vocab, (rows, args.seq + 1), generator=g)
    return {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}


def measure(args, key: str, ac: str) -> dict:
    """One layout and AC mode: build, step, and this rank's measured peak against its estimate."""
    _, tp, pp, cp = LAYOUTS[key]
    env = init_distributed(tp=tp, pp=pp, cp=cp)
    model_cfg = model_config(args)
    parallel_cfg = ParallelSection(tp=tp, pp=pp, cp=cp, activation_checkpointing=ac, dtype="fp32")
    shape = BatchShape(args.micro, args.micro * microbatches(args, pp) * env.dp_size, args.seq)
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("mem37.build"):
            runner = build_runner(model_cfg, parallel_cfg, shape, env, seed=0, document_masking=False,
                                  evaluates=False)
            optimizer = build_optimizer(runner.model, OptimSection())
        for step in range(args.steps):
            with record_function(f"mem37.step{step}"):
                batch = rank_batch(args, env, step)
                local = runner.forward_backward(batch)
                reduce_step(runner.model, optimizer, local, labelled_tokens(batch), False, 1.0, env,
                            runner.holds_loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                del batch, local
        del runner, optimizer
        gc.collect()
    after_build, peak, left = live_bytes(prof, "mem37.build")
    after_step0, _, _ = live_bytes(prof, "mem37.step0")
    est = rank_estimate(model_cfg, parallel_cfg, shape, env, False, pp_rank=env.pp_rank if pp > 1 else None)
    dist.barrier()
    return {"layout": key, "ac": ac, "rank": env.rank, "measured": peak, "estimated": sum(est.values()),
            "built": after_build, "steady": after_step0, "left": left, "terms": est}


def worker(args) -> None:
    count_every_thread()
    world = int(os.environ["WORLD_SIZE"])
    for key in args.layouts:
        if LAYOUTS[key][0] != world:
            raise SystemExit(f"layout {key} needs {LAYOUTS[key][0]} ranks, not {world}: run it on its own torchrun")
        for ac in args.ac:
            row = measure(args, key, ac)
            rows = [None] * world
            dist.all_gather_object(rows, row)  # printed by rank 0 alone: the ranks' lines would interleave
            if dist.get_rank() == 0:
                print("\n".join("MEM " + json.dumps(r) for r in rows), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def run_layouts(args, argv: list[str]) -> list[dict]:
    """One torchrun per world size, its layouts and AC modes in turn; the MEM lines of every rank."""
    rows = []
    options = [a for a in argv if a not in LAYOUTS]
    for world in sorted({LAYOUTS[k][0] for k in args.layouts}):
        keys = [k for k in args.layouts if LAYOUTS[k][0] == world]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", __file__, "--worker",
               *keys, *options]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if out.returncode:
            raise SystemExit(f"memory_check: {' '.join(keys)} failed:\n{out.stderr[-3000:]}")
        rows += [json.loads(line[4:]) for line in out.stdout.splitlines() if line.startswith("MEM ")]
    return rows


def table(rows: list[dict]) -> str:
    """One line per layout, AC mode and rank: measured and estimated MiB, their ratio, and the state alone."""
    lines = [f"{'layout':8} {'ac':5} {'rank':>4} {'measured':>9} {'estimated':>9} {'est/meas':>8}   "
             f"{'state':>7} {'est':>7}   (MiB; state: params + AdamW after step 1)"]
    for r in sorted(rows, key=lambda r: (r["layout"], r["ac"], r["rank"])):
        state = r["terms"].get("params", 0) + r["terms"].get("optimizer", 0)
        lines.append(f"{r['layout']:8} {r['ac']:5} {r['rank']:>4} {r['measured'] / MiB:9.2f} "
                     f"{r['estimated'] / MiB:9.2f} {r['estimated'] / r['measured']:8.3f}   "
                     f"{r['steady'] / MiB:7.2f} {state / MiB:7.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.worker:
        return worker(args)
    rows = run_layouts(args, argv)
    print(table(rows))
    for r in rows:
        if r["rank"] == 0:
            terms = ", ".join(f"{k} {v / MiB:.2f}" for k, v in r["terms"].items())
            print(f"{r['layout']} ac={r['ac']} rank 0 estimate (MiB): {terms}")


if __name__ == "__main__":
    main()
