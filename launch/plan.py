"""Plan a run's per-GPU memory and throughput before paying for it, and pick its parallel layout:

    llm-plan +conf=70b gpus=64 [tp=8] [dp_replicate=1] [micro_batch=1] [max_global_tokens=16777216]
    llm-plan +conf=405b gpus=512 tp=8 pp=8 [pp_schedule=Interleaved1F1B] [pp_microbatches=16] [virtual_stages=2]
    llm-plan +conf=long_8b gpus=64 data.seq_len=131072 [cp=8]   # context parallelism: cp GPUs share each sequence
    llm-plan --validate     # against measured peaks and published runs: a calibration and a held-out set
                            # (takes no other arguments); plans quote the held-out set's error

In a checkout, `python launch/plan.py +conf=70b gpus=64 ...` is the same command.

Planner keys (gpus, micro_batch, tp, cp, dp_replicate, pp, pp_schedule, pp_microbatches, virtual_stages,
max_global_tokens, and any field of train.planner.plan.Hardware) are key=value; the rest (+conf=..., model.*,
data.seq_len=..., parallel.float8=...) are the trainer's own overrides. tp, cp, dp_replicate, pp, pp_schedule and
virtual_stages default to the config's parallel.tp, parallel.cp, parallel.dp_replicate, parallel.pp,
parallel.pp_schedule and parallel.pp_virtual_stages; the config's layout is a starting point: where its dp_replicate
x cp x tp x pp does not divide gpus and none of them is set on the command line, every layout of gpus is planned.
The recommendation tries cp = 2, 4, ... only where no layout fits without context parallelism. pp_schedule is one of
torch.distributed.pipelining's 1F1B, Interleaved1F1B, GPipe, ZBVZeroBubble, InterleavedZeroBubble; virtual_stages
(stages per rank) defaults to 2 for the interleaved and ZBV schedules, and pp_microbatches to global_batch_size /
(data-parallel ranks x micro batch): pipeline micro-batches replace gradient accumulation (the trainer takes no
count: pp_microbatches=M plans the run whose global_batch_size is data-parallel ranks x micro batch x M).
"""

import statistics
import sys
from dataclasses import fields
from math import lcm
from pathlib import Path
from typing import NamedTuple

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from launch.cli_args import fail
from model import flops_per_token, preset
from train import config
from train.planner.plan import Hardware, Layout, pick, plan, recommend, why_nothing_fits
from train.planner.plan_pp import (
    LOOPED,
    ZERO_BUBBLE,
    Pipeline,
    microbatch_fixes,
    microbatch_problem,
    stage_problem,
)
from train.planner.memory import allocator_reserve_bytes
from train.planner.plan_cp import cp_problem
from train.planner.plan_tp import split_problem

ROOT = Path(__file__).resolve().parent.parent  # the checkout (installed editable): conf/ and the primary config

RUN_KEYS = ("gpus", "micro_batch", "tp", "cp", "dp_replicate", "max_global_tokens", "pp", "pp_microbatches",
            "virtual_stages")  # integers, not Hardware's
PLAN_KEYS = set(RUN_KEYS) | {"pp_schedule"} | {f.name for f in fields(Hardware)}
UNIT = ("efficiency", "no_compile_factor", "power_factor")  # Hardware fields within (0, 1]
SHARE = ("overlap", "tp_exposed", "async_tp_exposed", "cp_exposed", "efficiency_recompute")  # Hardware fields in [0, 1]
MAX_GLOBAL_TOKENS = 2**24  # 16M: the most Llama 3 405B's pretraining used per step
MAX_GPUS = 2**40  # beyond any cluster; keeps the search for its divisors (train.planner.plan.divisors) under a second


def check_value(word: str, key: str, v: float) -> None:
    """End the program in one line if a planner value is out of its range."""
    if key in UNIT and not 0 < v <= 1:
        fail(f"{word}: {key} must be within (0, 1]")
    if key in SHARE and not 0 <= v <= 1:
        fail(f"{word}: {key} must be within [0, 1]")
    if key not in UNIT + SHARE and not v > 0:
        fail(f"{word}: {key} must be > 0")
    if key == "gpus" and v > MAX_GPUS:
        fail(f"{word}: gpus must be at most 2**40 = {MAX_GPUS:,}")


def planner_values(words: list[str]) -> tuple[dict, Hardware]:
    """The run's integers (gpus, micro_batch, ...) and Hardware from the planner's key=value words; a bad
    value ends the program with a one-line error naming it."""
    types = dict.fromkeys(RUN_KEYS, int) | {f.name: f.type for f in fields(Hardware)} | {"pp_schedule": str}
    values = {}
    for word in words:
        key, raw = word.split("=", 1)
        try:
            values[key] = types[key](raw)
        except ValueError:
            fail(f"{word}: {key} takes {'an integer' if types[key] is int else 'a number'}")
        if key != "pp_schedule":  # checked with the layout (check_pipeline)
            check_value(word, key, values[key])
    hw = Hardware(**{k: v for k, v in values.items() if k in {f.name for f in fields(Hardware)}})
    return {k: v for k, v in values.items() if k in PLAN_KEYS and k not in vars(hw)}, hw


def check_layout(run: dict, train_cfg, model_cfg, hw: Hardware) -> Layout:
    """The layout to plan, from the planner keys or the config; one-line errors for what the trainer
    refuses, a warning for TP across nodes (the trainer warns too)."""
    gpus, tp = run.get("gpus", 8), run.get("tp", train_cfg.parallel.tp)
    replicas = run.get("dp_replicate", train_cfg.parallel.dp_replicate)
    pp = run.get("pp", train_cfg.parallel.pp)
    cp = check_cp(run, train_cfg, gpus, tp, pp)
    with_pp = f" x pp={pp}" if pp > 1 else ""
    if gpus % (tp * pp):
        fail(f"tp={tp}{with_pp} must divide gpus={gpus} (a TP group is tp GPUs{', a pipeline pp' * bool(with_pp)}); "
             f"pick {'ones' if with_pp else 'a tp'} that divide{'' if with_pp else 's'} it")
    if gpus % (replicas * cp * tp * pp):
        with_cp = f" x cp={cp}" if cp > 1 else ""
        fail(f"dp_replicate={replicas}{with_cp} x tp={tp}{with_pp} must divide gpus={gpus}; pick dp_replicate dividing "
             f"{gpus // (cp * tp * pp)}")
    problem = split_problem(model_cfg, train_cfg.data.seq_len, tp)
    if problem:
        fail(problem)
    if train_cfg.parallel.cpu_offload and pp > 1:
        fail(f"parallel.cpu_offload=true does not run under pipeline parallelism (pp={pp}); set pp=1 or "
             f"parallel.cpu_offload=false")
    if tp > hw.gpus_per_node:
        sys.stderr.write(f"warning: tp={tp} is larger than the {hw.gpus_per_node} GPUs of a node (gpus_per_node): "
                         f"TP's per-block collectives cross the network ({hw.inter_node_gbs:.0f} GB/s per GPU); keep "
                         f"tp within a node and scale with data parallelism\n")
    per_step = gpus // (cp * tp * pp) * run.get("micro_batch", train_cfg.micro_batch_size)
    if pp == 1 and train_cfg.global_batch_size % per_step:  # under PP check_pipeline refuses it
        sys.stderr.write(f"warning: global_batch_size={train_cfg.global_batch_size} is not a multiple of data-parallel "
                         f"ranks x micro batch = {per_step}: the trainer refuses this layout (planned anyway)\n")
    return Layout(replicas, gpus // (replicas * cp * tp * pp), tp, pp, cp)


def check_cp(run: dict, train_cfg, gpus: int, tp: int, pp: int) -> int:
    """The layout's cp from the planner keys or the config; one-line errors for what the trainer refuses."""
    cp = run.get("cp", train_cfg.parallel.cp)
    if gpus % (cp * tp):
        fail(f"cp={cp} x tp={tp} must divide gpus={gpus} (a CP group is cp x tp GPUs); pick a cp that divides "
             f"{gpus // tp if gpus % tp == 0 else gpus}")
    problem = cp_problem(train_cfg.data.seq_len, cp, tp)
    if problem:
        fail(problem)
    return cp


def check_pipeline(run: dict, train_cfg, model_cfg, layout: Layout) -> Pipeline | None:
    """The pipeline schedule of a pp > 1 layout from the planner keys (None without PP); one-line errors for
    what torch.distributed.pipelining refuses."""
    if layout.pp == 1:
        return None
    schedule = run.get("pp_schedule", train_cfg.parallel.pp_schedule)
    v = run.get("virtual_stages",
                train_cfg.parallel.pp_virtual_stages or (2 if schedule in LOOPED + ZERO_BUBBLE else 1))
    per_step = (layout.dp_replicate * layout.dp_shard) * run.get("micro_batch", train_cfg.micro_batch_size)
    if "pp_microbatches" not in run and train_cfg.global_batch_size % per_step:
        fail(f"global_batch_size={train_cfg.global_batch_size} must be a multiple of data-parallel ranks x micro batch "
             f"= {per_step} under PP (its micro-batches replace gradient accumulation); change one of them")
    pipe = Pipeline(schedule, run.get("pp_microbatches", train_cfg.global_batch_size // per_step), v)
    problem = stage_problem(pipe, layout.pp, model_cfg.n_layers)
    if problem:
        fail(problem)
    problem = microbatch_problem(pipe, layout.pp)
    if problem:
        fail(microbatch_error(problem, run, train_cfg, layout))
    if schedule in ZERO_BUBBLE and train_cfg.parallel.compile:
        fail(f"pp_schedule={schedule}: torch.distributed.pipelining refuses compiled stages for its zero-bubble "
             f"schedules; set parallel.compile=false")
    return pipe


def microbatch_error(problem: str, run: dict, train_cfg, layout: Layout) -> str:
    """The error for a pipeline's micro-batch count that torch refuses, with the keys that set it here."""
    pp = layout.pp
    if "pp_microbatches" in run:
        return f"pp_microbatches={problem}; use a multiple of pp={pp}"
    data, micro_batch = layout.dp_replicate * layout.dp_shard, run.get("micro_batch", train_cfg.micro_batch_size)
    smaller, per_rank = microbatch_fixes(train_cfg.global_batch_size // data, micro_batch, pp)
    lower = f"micro_batch={smaller} or " if smaller else ""
    return (f"global_batch_size / (data-parallel ranks x micro batch) = {train_cfg.global_batch_size} / ({data} x "
            f"{micro_batch}) = {problem}; set {lower}global_batch_size={per_rank * data} (a multiple of pp={pp} "
            f"micro-batches per step)")


def print_assumptions(hw: Hardware, run: dict) -> None:
    print(f"assumptions: {hw.peak_tflops:.0f} TFLOP/s peak x {hw.efficiency:.1%} efficiency x {hw.power_factor} "
          f"power, {hw.memory_gib} GiB per GPU, {hw.gpus_per_node} GPUs per node; float8 (tensorwise) block matmuls "
          f"{hw.float8_speedup}x at Llama 3.1 8B's shape, up to {hw.float8_gemm_ratio}x in wider models as casting "
          f"(tokens x (K + N) per tokens x K x N matmul) shrinks; memory calibrated on one H100")
    if run.get("cpu_offload"):
        print(f"  cpu_offload: fp32 parameters, gradients and AdamW state (16 bytes a parameter) in host memory; "
              f"fp32 shards over PCIe at {hw.pcie_gbs:.0f} GB/s per GPU (to the GPU for the forward and the backward, "
              f"gradients back), {hw.overlap:.0%} hidden under compute; the host's adds of each micro-batch's "
              f"gradients and its AdamW at {hw.host_gbs:.0f} GB/s per node (assumed), exposed")
    print(f"  FSDP: bf16 all-gather forward and backward, fp32 reduce-scatter of each rank's 1/tp of the weights, "
          f"{hw.intra_node_gbs:.0f} GB/s in a node / {hw.inter_node_gbs:.0f} GB/s per GPU across nodes, "
          f"{hw.overlap:.0%} hidden under compute; HSDP adds an fp32 all-reduce over the replicas")
    print(f"  TP (sequence parallel): per block 2 all-gathers + 2 reduce-scatters of the micro-batch's (tokens x "
          f"dim) activations forward, as many backward, the forward's again under AC; ring traffic (tp-1)/tp of "
          f"each, at {hw.intra_node_gbs:.0f} GB/s in a node (NCCL's on 8 H100s); {hw.tp_exposed:.0%} of it exposed "
          f"({hw.async_tp_exposed:.1%} with async TP)")
    print(f"  weights, gradients, optimizer state and activations divided by tp (the gathered norm outputs and "
          f"partial sums whole); layouts: tp in powers of 2 within a node, pp in powers of 2, smallest global batch "
          f"(data-parallel ranks x micro batch x seq_len) at most {run.get('max_global_tokens', MAX_GLOBAL_TOKENS):,} "
          f"tokens; under PP the config's global_batch_size, split into data-parallel ranks x micro-batches")
    print("  PP (pp outermost, torch.distributed.pipelining): step = (micro-batches + bubble) x the slowest rank's "
          "micro-batch; bubble (p-1) for GPipe and 1F1B, (p-1)/v interleaved (Narayanan et al. 2021), "
          "(p-1)(T_F+T_B-T_W)/v for InterleavedZeroBubble and (p-1)(T_F+T_B-2T_W) for ZBV (Qi et al. 2023), with "
          "T_B = T_F + the AC recompute, T_W = T_F")
    print(f"  PP: torchtitan's layer split (the remainder to the middle stages; embedding first, norm + head + loss "
          f"last); per micro-batch and boundary bf16 (micro batch x seq_len x dim)/tp activations forward and their "
          f"gradient backward, across nodes ({hw.inter_node_gbs:.0f} GB/s) once dp x tp fills a node, only the fill's "
          f"and drain's exposed; FSDP gathers once a step and its fp32 reduce-scatter after the last backward is "
          f"exposed; per rank the weights stay gathered and the fp32 gradients whole all step, plus the activations "
          f"of its in-flight micro-batches (1F1B: pp - rank; GPipe: all); zero-bubble schedules run without "
          f"compile")
    print(f"  CP (cp x tp consecutive ranks, load-balanced 2 x cp chunks: 1/cp of the causal work each): per block an "
          f"all-gather of its bf16 K and V to the whole window, a reduce-scatter of their gradients, the all-gather "
          f"again under AC; ring traffic (cp-1)/cp, at {hw.intra_node_gbs:.0f} GB/s while cp x tp fits a node, else "
          f"{hw.inter_node_gbs:.0f} GB/s; {hw.cp_exposed:.0%} exposed; flex's (T/cp, T) BlockMask: attention "
          f"{hw.cp_mask_attention}x the causal kernels' time; memory: the mask and the gathered K/V of every block "
          f"not recomputed")


def describe(p: dict) -> str:
    if "offload_share" in p:
        return (f"{p['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU (compute {p['compute_s']:.2f} s, TP "
                f"{p['tp_s']:.2f} s, FSDP {p['comm_s']:.2f} s per micro-batch; cpu_offload: {p['host_gib']:.1f} GiB "
                f"of host memory per GPU, PCIe {p['pcie_s']:.2f} s and host {p['host_s']:.2f} s per micro-batch, "
                f"the CPU's AdamW {p['optimizer_s']:.2f} s per step: {p['offload_share']:.0%} of the step time)")
    if "step_s" not in p:
        cp = f", CP {p['cp_s']:.2f} s" if p.get("cp_s") else ""
        return (f"{p['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU (compute {p['compute_s']:.2f} s, TP "
                f"{p['tp_s']:.2f} s{cp}, FSDP {p['comm_s']:.2f} s per micro-batch)")
    stages = ", ".join(f"rank {r} {gib:.1f}" for r, gib in p["stage_gib"].items())
    return (f"{p['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU (step {p['step_s']:.1f} s: the slowest rank's "
            f"micro-batch {p['compute_s']:.2f} s, bubble {p['bubble']:.1%}, P2P {p['p2p_s']:.2f} s exposed of "
            f"{p['p2p_bytes'] / 1e9:.1f} GB sent per GPU, FSDP {p['comm_s']:.2f} s exposed; GiB by pipeline rank: "
            f"{stages})")


def show(name: str, model_cfg, layout: Layout, seq_len: int, micro_batch: int, ac: str, hw: Hardware,
         **options) -> None:
    if options.get("cpu_offload"):  # the step's micro-batches: its share of the CPU's optimizer step
        data = layout.dp_replicate * layout.dp_shard
        options = {**options, "accumulation": max(1, options.pop("global_batch") // (data * micro_batch))}
    options.pop("global_batch", None)
    p = plan(model_cfg, layout, micro_batch, seq_len, ac, hw, **options)
    parts = ", ".join(f"{k} {v:.1f}" for k, v in p["memory_gib"].items())
    pipe = f", {options['pipeline']}" if options.get("pipeline") else ""
    print(f"{name} on {layout.gpus} GPUs ({layout}{pipe}), micro batch {micro_batch} x {seq_len}, AC {ac}: "
          f"{p['total_gib']:.1f} GiB per GPU ({parts}){'' if p['fits'] else ' -- DOES NOT FIT'}; {describe(p)}")


def trainer_keys(best: dict, global_batch: int | None = None) -> str:
    """The trainer overrides that run a recommended plan; global_batch: a global_batch_size to set with them."""
    layout, pipe = best["layout"], best["pipeline"]
    keys = (f"parallel.tp={layout.tp} parallel.pp={layout.pp} parallel.dp_replicate={layout.dp_replicate} "
            f"parallel.cp={layout.cp} micro_batch_size={best['micro_batch']} "
            f"parallel.activation_checkpointing={best['ac']}")
    if "offload_share" in best:
        keys += " parallel.cpu_offload=true"
    if pipe is None:  # parallel.pp=1 too: a preset's pp (conf/405b.yaml's 8) would stay otherwise
        return f"{keys} global_batch_size={global_batch}" if global_batch else keys
    data = layout.dp_replicate * layout.dp_shard
    return (f"{keys} parallel.pp_schedule={pipe.schedule} "
            f"parallel.pp_virtual_stages={pipe.virtual_stages} global_batch_size="
            f"{data * best['micro_batch'] * pipe.microbatches}{'' if best['compile'] else ' parallel.compile=false'}")


def show_recommendation(model_cfg, gpus: int, seq_len: int, hw: Hardware, max_tokens: int, global_batch: int,
                        **options) -> int:
    """The best plan of each tp without PP and of each pp, then the recommended one (and the best with PP
    where it is not); 1 if nothing fits. global_batch: the sequences per step PP splits into micro-batches."""
    best, plans, batch = recommend_or_rebatch(model_cfg, gpus, seq_len, hw, max_tokens, global_batch, **options)
    if best is None:
        reasons = why_nothing_fits(model_cfg, gpus, seq_len, hw, max_tokens, global_batch, **options)
        more = fewest_gpus(model_cfg, gpus, seq_len, hw, max_tokens, global_batch, **options) if "memory" in reasons \
            else None
        offload = offload_fits(model_cfg, gpus, seq_len, hw, max_tokens, global_batch, **options)
        print(f"recommendation: nothing fits on {gpus:,} GPUs: "
              f"{nothing_fits(reasons, seq_len, hw, max_tokens, global_batch, more)}{offload}")
        return 1
    print("best of each cp x tp without PP, then of each pp (AC mode, micro batch and schedule chosen per layout):")
    groups = [[p for p in plans if p["layout"].pp == 1 and (p["layout"].cp, p["layout"].tp) == split]
              for split in sorted({(p["layout"].cp, p["layout"].tp) for p in plans})]
    groups += [[p for p in plans if p["layout"].pp == pp] for pp in sorted({p["layout"].pp for p in plans} - {1})]
    for top in (pick(group) for group in groups if group):
        pipe = f", {top['pipeline']}" if top["pipeline"] else ""
        print(f"  {top['layout']}{pipe}, micro batch {top['micro_batch']}, AC {top['ac']}: {top['total_gib']:.1f} GiB, "
              f"{'global' if pipe else 'smallest global'} batch {top['min_global_tokens']:,} tokens; {describe(top)}")
    new_batch = batch if batch != global_batch else None
    show_pick("recommendation", best, new_batch)
    other = pick([p for p in plans if bool(p["pipeline"]) != bool(best["pipeline"])])  # the trainer runs no PP yet
    if other:
        title = "best without PP" if best["pipeline"] else "best with PP"
        gain = other["tokens_per_s_per_gpu"] / best["tokens_per_s_per_gpu"] - 1
        show_pick(f"{title} ({gain:+.1%})", other, new_batch)
    return 0


def offload_fits(model_cfg, gpus: int, seq_len: int, hw: Hardware, max_tokens: int, global_batch: int,
                 **options) -> str:
    """"; or set parallel.cpu_offload=true ..." where offloading the fp32 state to the host makes a plan fit."""
    if options.get("cpu_offload"):
        return ""
    best, _ = recommend(model_cfg, gpus, seq_len, hw, max_tokens, global_batch, **{**options, "cpu_offload": True})
    if best is None:
        return ""
    return (f"; or set parallel.cpu_offload=true: the fp32 state on the host ({best['host_gib']:.0f} GiB per GPU), "
            f"{best['total_gib']:.0f} GiB per GPU, {best['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU")


def batch_ranks(reasons: dict[str, list[Layout]], global_batch: int) -> list[int]:
    """The data-parallel rank counts of the layouts that have no plan because global_batch does not divide over
    them (why_nothing_fits's "batch" reason)."""
    ranks = {lay.dp_replicate * lay.dp_shard for lay in reasons.get("batch", ())}
    return sorted(d for d in ranks if global_batch % d)


def nearest_batches(global_batch: int, ranks: list[int]) -> list[int]:
    """The multiples of every count in ranks next to global_batch, nearest first."""
    step = lcm(*ranks)
    below = global_batch // step * step
    return sorted((g for g in (below, below + step) if g > 0), key=lambda g: (abs(g - global_batch), -g))


def recommend_or_rebatch(model_cfg, gpus: int, seq_len: int, hw: Hardware, max_tokens: int, global_batch: int,
                         **options) -> tuple[dict | None, list[dict], int]:
    """recommend()'s best plan and plans, and the global batch they take: where no layout has a plan because the
    config's global_batch_size does not divide over the data-parallel ranks, those of the nearest global batch
    that does, saying so."""
    best, plans = recommend(model_cfg, gpus, seq_len, hw, max_tokens, global_batch, **options)
    if best is not None:
        return best, plans, global_batch
    ranks = batch_ranks(why_nothing_fits(model_cfg, gpus, seq_len, hw, max_tokens, global_batch, **options),
                        global_batch)
    for batch in nearest_batches(global_batch, ranks) if ranks else ():
        best, plans = recommend(model_cfg, gpus, seq_len, hw, max_tokens, batch, **options)
        if best is not None:
            also = "".join(f" (global_batch_size={g} also works)" for g in nearest_batches(global_batch, ranks)
                           if g != batch)
            print(f"global_batch_size={global_batch} sequences do not divide over the data-parallel ranks of {gpus:,} "
                  f"GPUs ({', '.join(f'{r:,}' for r in ranks)}, by layout): planned with global_batch_size={batch}, "
                  f"the nearest multiple of {lcm(*ranks):,}{also}; set it with the keys below")
            return best, plans, batch
    return None, [], global_batch


def fewest_gpus(model_cfg, gpus: int, seq_len: int, hw: Hardware, max_tokens: int, global_batch: int,
                **options) -> int | None:
    """The first of 2, 4, ... 1024 x gpus on which a layout fits, or None."""
    for more in (gpus * 2**k for k in range(1, 11)):
        if more <= MAX_GPUS and recommend(model_cfg, more, seq_len, hw, max_tokens, global_batch, **options)[0]:
            return more
    return None


def nothing_fits(reasons: dict[str, list[Layout]], seq_len: int, hw: Hardware, max_tokens: int,
                 global_batch: int, more_gpus: int | None = None) -> str:
    """Why no layout has a plan, each cause with the change that removes it (train.planner.plan.why_nothing_fits);
    more_gpus: the fewest GPUs found to fit (fewest_gpus)."""
    said = []
    if "batch" in reasons:
        ranks = batch_ranks(reasons, global_batch)
        if ranks:
            near = " or ".join(str(g) for g in nearest_batches(global_batch, ranks))
            said.append(f"global_batch_size={global_batch} is not a multiple of the data-parallel ranks "
                        f"({', '.join(f'{r:,}' for r in ranks)}); pick gpus whose data-parallel ranks divide it, or "
                        f"a global_batch_size they divide (e.g. global_batch_size={near})")
        else:
            said.append(f"global_batch_size={global_batch} leaves too few pipeline micro-batches per data-parallel "
                        f"rank for pp; raise global_batch_size")
    if "tokens" in reasons:
        fewest = min(lay.dp_replicate * lay.dp_shard for lay in reasons["tokens"])
        said.append(f"{fewest:,} or more data-parallel ranks x a micro batch of {seq_len:,} tokens exceed "
                    f"max_global_tokens={max_tokens:,} per step (room for {max_tokens // seq_len:,} sequences); use "
                    f"fewer GPUs or raise max_global_tokens")
    if "memory" in reasons:
        fewest = f" (of 2, 4, 8, ... times as many, gpus={more_gpus:,} is the first that fits)" if more_gpus else ""
        said.append(f"{'the other layouts' if said else 'every layout'} needs more than {hw.memory_gib} GiB per GPU; "
                    f"add GPUs{fewest} or shorten data.seq_len")
    return "; ".join(said)


def show_pick(title: str, best: dict, global_batch: int | None = None) -> None:
    pipe = f", {best['pipeline']}" if best["pipeline"] else ""
    print(f"{title}: {best['layout']}{pipe} -- {trainer_keys(best, global_batch)} -> "
          f"{best['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, {best['total_gib']:.1f} GiB, global batch "
          f"{'' if pipe else 'a multiple of '}"
          f"{best['min_global_tokens']:,} tokens; {held_out_band()}")


def memory_rows() -> list[tuple[str, float, float]]:
    """(what, planned GiB, measured GiB): this trainer's peaks on one H100 (torch 2.11, compile, residual
    stream still fp32)."""
    rows = []
    for name, mb, seq, ac, measured in (("tt_1b", 2, 8192, "none", 42.6), ("tt_1b", 8, 2048, "none", 42.6),
                                        ("tt_8b_l8", 1, 8192, "none", 50.9), ("tt_8b_l8", 1, 8192, "selective", 44.9)):
        planned = plan(preset(name), Layout(), mb, seq, ac, Hardware())["total_gib"]
        rows.append((f"{name} {mb}x{seq} AC {ac}", planned, measured))
    return rows


# torchtitan on our H100 (700 W, compile, Llama-3-8B layers x 8, 1 x 8192), an independent measurement: 51.4% MFU
# without AC (and 47.1% with its selective AC, which the planner now predicts from its policy: sac="torchtitan").
# Its runs are planned at that efficiency, recompute counted from their AC mode alone, at the calibrated 500 W factor.
TORCHTITAN_H100 = Hardware(efficiency=0.514, efficiency_recompute=0.0, power_factor=0.8)
TT = {"sac": "torchtitan"}  # torchtitan's selective AC policy (train/planner/plan.py SAC_POLICIES)


class Run(NamedTuple):
    """A published run: its source, config, figure (tokens/s per GPU) and the Hardware it is planned on."""
    source: str
    model: str
    layout: Layout
    micro_batch: int
    ac: str
    options: dict
    published: float
    hw: Hardware = TORCHTITAN_H100
    note: str = ""  # how the figure was read, and what the model lacks where it misses


TT_2412 = "torchtitan benchmarks/llama3_h100_202412_torchtitan.md (Dec 2024)"
TT_2408 = "torchtitan docs/performance.md (Aug 2024)"
TT_ASYNC = "torchtitan benchmarks/asyncTP_llama3_h100_2025-06_torchtitan.md (Jun 2025)"
# The calibration set: torchtitan's published runs on 96 GB H100s at 500 W, seq_len 8192, compile unless said; the
# constants marked "calibrated on the calibration set" (train/planner/plan.py Hardware) were set from these. The 405B
# 3D rows (table 5) ran FSDP 8 x TP 8 x PP 8, float8 (tensorwise) + async TP, local batch 32, with torchtitan's
# defaults at the commit it names (9dec370): 8 pp micro-batches of 4 sequences, 2 stages per rank for
# Interleaved1F1B (pipelining_utils.py build_pipeline_schedule, generate_split_points).
PUBLISHED_3D = (
    Run(f"{TT_2412} table 5", "405b", Layout(1, 8, 8, 8), 4, "full",
        {"float8": True, "async_tp": True, "pipeline": Pipeline("1F1B", 8)}, 100),
    Run(f"{TT_2412} table 5", "405b", Layout(1, 8, 8, 8), 4, "full",
        {"float8": True, "async_tp": True, "pipeline": Pipeline("Interleaved1F1B", 8, 2)}, 128),
)
# Table 5's memory (GiB, the largest over the ranks of torchtitan's max reserved, the allocator's cache included).
PUBLISHED_3D_GIB = (82.5, 72.7)
CALIBRATION = (
    Run(f"{TT_2412} table 1", "8b", Layout(1, 8, 1), 2, "selective", {"compile": False, **TT}, 5762),
    Run(f"{TT_2412} table 1", "8b", Layout(1, 8, 1), 2, "selective", TT, 6667),
    Run(f"{TT_2412} table 1", "8b", Layout(1, 8, 1), 2, "selective", {"float8": True, **TT}, 8532),
    Run(f"{TT_2412} table 3", "8b", Layout(1, 128, 1), 2, "selective", {"compile": False, **TT}, 5605),
    Run(f"{TT_2412} table 3", "8b", Layout(1, 128, 1), 2, "selective", TT, 6514),
    Run(f"{TT_2412} table 4", "70b", Layout(1, 32, 8), 16, "full", {"float8": True}, 829),
    Run(f"{TT_2412} table 4", "70b", Layout(1, 32, 8), 16, "full", {"float8": True, "async_tp": True}, 876),
    Run(TT_2408, "405b", Layout(1, 16, 8), 2, "full", {}, 109),
    Run(TT_2408, "405b", Layout(1, 16, 8), 2, "full", {"float8": True}, 177),
    Run(TT_2408, "405b", Layout(1, 16, 8), 2, "full", {"float8": True, "async_tp": True}, 185),
    Run(f"{TT_ASYNC}, 70B", "70b", Layout(1, 32, 8), 16, "full", {}, 597.3),
    Run(f"{TT_ASYNC}, 70B", "70b", Layout(1, 32, 8), 16, "full", {"async_tp": True}, 652.4),
    Run(f"{TT_ASYNC}, 70B", "70b", Layout(1, 32, 8), 16, "full", {"float8": True}, 809.8),
    Run(f"{TT_ASYNC}, 70B", "70b", Layout(1, 32, 8), 16, "full", {"float8": True, "async_tp": True}, 942.4),
) + PUBLISHED_3D
PUBLISHED = CALIBRATION  # the name older code knew

# The held-out set: published runs no constant was set from.
H200 = Hardware(efficiency=0.514, efficiency_recompute=0.0, memory_gib=139.0)  # 700 W TDP (assumed), same bf16 peak
LLAMA3_PAPER = ("Llama 3 paper (arXiv 2407.21783, Jul 2024) table 4: TFLOP/s per GPU / the planner's FLOPs per token "
                "(attention's full square); no AC (sec. 3.3.2); pipeline stages per rank not published: 2 assumed")
H200_LACKS = ("lacks: the H200's faster HBM3e (4.8 vs 2.4 TB/s): the memory-bound norms, activations and float8 casts "
              "run faster than on the H100 the efficiency was measured on")
TRAINY = ("torchtitan benchmarks/llama3_8b_h200_2025-06_torchtitan.md (Trainy, Jun 2025): llama3_8b.toml at e7c0cae "
          "(selective op AC), float8 tensorwise with float8 FSDP all-gathers (planned bf16)")
NARROW_TP = ("lacks: what TP 8 costs a model this narrow beyond its collectives' bytes at NCCL's bus bandwidth (its "
             "GEMMs are large enough for full rate, GEMM_CURVE): these rows imply more TP time than the bytes take and "
             "async TP hiding about a third of it; not modelled: NCCL's kernels taking SMs from the matmuls they "
             "overlap, a reduce-scatter slower than an all-gather")
HELD_OUT = (
    Run(f"{TT_ASYNC}, 8B", "8b", Layout(1, 8, 8), 12, "selective", TT, 4378, note=NARROW_TP),
    Run(f"{TT_ASYNC}, 8B", "8b", Layout(1, 8, 8), 12, "selective", {"async_tp": True, **TT}, 4809.4, note=NARROW_TP),
    Run(f"{TT_ASYNC}, 8B", "8b", Layout(1, 8, 8), 12, "selective", {"float8": True, **TT}, 5078.1, note=NARROW_TP),
    Run(f"{TT_ASYNC}, 8B", "8b", Layout(1, 8, 8), 12, "selective", {"float8": True, "async_tp": True, **TT}, 5570.1,
        note=NARROW_TP),
    Run(TRAINY, "8b", Layout(1, 32, 1), 2, "selective", {"float8": True, **TT}, 10938, H200, H200_LACKS),
    Run(TRAINY, "8b", Layout(1, 64, 1), 2, "selective", {"float8": True, **TT}, 10753, H200, H200_LACKS),
    Run(LLAMA3_PAPER, "405b", Layout(1, 64, 8, 16), 1, "none", {"pipeline": Pipeline("Interleaved1F1B", 32, 2)},
        430e12, Hardware()),
    Run(LLAMA3_PAPER, "405b", Layout(1, 128, 8, 16), 1, "none", {"pipeline": Pipeline("Interleaved1F1B", 16, 2)},
        400e12, Hardware(), "lacks: Meta's tuned interleaved schedule (stages per rank not published; at 2 the bubble "
        "is 15 / (2 x 16) = 47% of its 16 micro-batches)"),
)


def published_tokens(run: Run) -> float:
    """The run's tokens/s per GPU; the Llama 3 paper gives FLOP/s per GPU, read at the planner's FLOPs per token."""
    if run.published < 1e9:
        return run.published
    return run.published / flops_per_token(preset(run.model), 8192)


def describe_run(run: Run) -> str:
    o, pipe = run.options, f", {run.options['pipeline']}" if "pipeline" in run.options else ""
    return (f"{run.model} {run.layout.gpus} GPUs ({run.layout}{pipe}), {'float8' if o.get('float8') else 'bf16'}"
            f"{', async TP' * o.get('async_tp', False)}{', no compile' * (not o.get('compile', 1))}, "
            f"AC {run.ac}, {run.micro_batch} x 8192")


def run_rows(runs) -> list[tuple[str, float, float, Run]]:
    """(what, planned, published tokens/s per GPU, the run) of each published run."""
    return [(describe_run(r), plan(preset(r.model), r.layout, r.micro_batch, 8192, r.ac, r.hw, **r.options)
             ["tokens_per_s_per_gpu"], published_tokens(r), r) for r in runs]


def throughput_rows() -> list[tuple[str, float, float]]:
    """(what, planned, published tokens/s per GPU) for the calibration set."""
    return [row[:3] for row in run_rows(CALIBRATION)]


def held_out_rows() -> list[tuple[str, float, float]]:
    """(what, planned, published tokens/s per GPU) for the held-out set."""
    return [row[:3] for row in run_rows(HELD_OUT)]


def error_summary(rows) -> tuple[float, float, str]:
    """(median |error|, worst |error|, the worst row's what) of (what, planned, published) rows."""
    errors = sorted((abs(planned / published - 1), what) for what, planned, published in rows)
    return statistics.median(e for e, _ in errors), errors[-1][0], errors[-1][1]


def held_out_band() -> str:
    """The planner's expected error from the held-out set, said with every recommendation."""
    median, worst, _ = error_summary(held_out_rows())
    return f"expect ±{median:.0%} (held-out median |err|, worst {worst:.0%}: llm-plan --validate)"


def print_runs(title: str, runs, within: float | None) -> int:
    """Each run with its source, config, published figure, plan and error, then the set's summary; the rows
    off by more than `within` (None: reported only)."""
    print(title)
    bad, rows = 0, run_rows(runs)
    for what, planned, published, run in rows:
        err = planned / published - 1
        off = within is not None and abs(err) > within
        bad += off
        verdict = "" if within is None else (" OFF" if off else " ok")
        note = f"\n      {run.note}" if run.note and abs(err) > 0.10 else ""
        print(f"  {what}: planned {planned:,.0f}, published {published:,.0f} tokens/s per GPU ({err:+.1%}){verdict}"
              f"\n      source: {run.source}{note}")
    median, worst, which = error_summary([row[:3] for row in rows])
    print(f"  summary: median |err| {median:.1%}, worst {worst:.1%} ({which})")
    return bad


def validate() -> int:
    """Memory against this trainer's H100 peaks (10%) and throughput against the calibration set (15%) set the exit
    status; the held-out set is reported."""
    bad = 0
    print("memory, measured on one H100 (torch 2.11, compile, this trainer, residual stream still fp32):")
    for what, planned, measured in memory_rows():
        ok = abs(planned / measured - 1) <= 0.10
        bad += not ok
        print(f"  {what}: planned {planned:.1f}, measured {measured} GiB ({planned / measured - 1:+.1%}) "
              f"{'ok' if ok else 'OFF'}")
    bad += print_runs("throughput, calibration set (torchtitan's published H100 runs; 96 GB, 500 W; within 15%):",
                      CALIBRATION, 0.15)
    print_runs("throughput, held-out set (no constant set from these; reported, aim: median |err| <= 10%, none over "
               "20%):", HELD_OUT, None)
    print("memory of the 3D rows, not checked: torchtitan reports the allocator's reserved memory, planned as the "
          "allocated peak plus the FSDP streams' cached buffers (train/planner/memory.py allocator_reserve_bytes); "
          "fragmentation and NCCL's own buffers are not planned:")
    for run, published in zip(PUBLISHED_3D, PUBLISHED_3D_GIB):
        model_cfg = preset(run.model)
        p = plan(model_cfg, run.layout, run.micro_batch, 8192, run.ac, Hardware(memory_gib=94.0), **run.options)
        reserve = sum(allocator_reserve_bytes(model_cfg, run.layout.dp_shard, run.layout.tp).values()) / 2**30
        reserved = p["total_gib"] + reserve
        print(f"  {run.options['pipeline'].schedule}: planned {p['total_gib']:.1f} GiB allocated (by rank: "
              f"{', '.join(f'{r} {gib:.1f}' for r, gib in p['stage_gib'].items())}) + {reserve:.1f} GiB reserve = "
              f"{reserved:.1f} GiB reserved, published {published} GiB ({reserved / published - 1:+.1%})")
    return 1 if bad else 0


def trainer_config(overrides: list[str]):
    """The trainer's config and the model shape it names; a bad override ends the program in one line."""
    problem = config.check_overrides(overrides, ROOT / "conf")
    if problem:
        fail(problem)
    config.register()
    try:
        with initialize_config_dir(config_dir=str(ROOT), version_base="1.3"):
            train_cfg = OmegaConf.to_object(compose("pretrain", overrides=overrides))
        shape = {k: v for k, v in vars(train_cfg.model).items()
                 if k not in ("preset", "vocab_from_tokenizer") and v is not None}
        model_cfg = preset(train_cfg.model.preset, **shape)
    except (HydraException, ValueError) as e:  # an override's syntax, an unknown preset, a bad shape
        fail(str(e).strip().splitlines()[0])
    if train_cfg.data.seq_len < 1:
        fail(f"data.seq_len={train_cfg.data.seq_len} must be >= 1")
    return train_cfg, model_cfg


def main(argv: list[str] | None = None) -> int:
    """`llm-plan`: argv (default: the command line's); the exit status (1: nothing fits, or --validate is off)."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip())
        return 0
    check_flags(argv)
    if argv == ["--validate"]:
        return validate()
    ours = [a for a in argv if a.split("=", 1)[0] in PLAN_KEYS]
    run, hw = planner_values(ours)
    overrides = [a for a in argv if a not in ours]
    train_cfg, model_cfg = trainer_config(overrides)
    # rowwise float8 is planned as bf16: torchtitan measured it no faster under TP (70B x TP 8: 599.6 vs 597.3
    # tokens/s, benchmarks/asyncTP_llama3_h100_2025-06_torchtitan.md).
    flags = {"compile": train_cfg.parallel.compile, "float8": train_cfg.parallel.float8 == "tensorwise",
             "async_tp": train_cfg.parallel.async_tp, "cpu_offload": train_cfg.parallel.cpu_offload}
    gpus = run.get("gpus", 8)
    if layout_pinned(run, overrides) or not preset_layout_misfit(train_cfg, gpus):
        show_config_layout(run, train_cfg, model_cfg, hw, flags)
    code = show_recommendation(model_cfg, gpus, train_cfg.data.seq_len, hw,
                               run.get("max_global_tokens", MAX_GLOBAL_TOKENS), train_cfg.global_batch_size, **flags)
    # after the answer: the reader wants the answer first
    print_assumptions(hw, {**run, "cpu_offload": train_cfg.parallel.cpu_offload})
    return code


def check_flags(argv: list[str]) -> None:
    """One-line errors for options llm-plan does not take (Hydra would fail on them with a lexer error)."""
    if "--validate" in argv and argv != ["--validate"]:
        fail("--validate checks the planner against fixed measured and published figures and takes no other "
             "arguments: run `llm-plan --validate` alone, or leave it out to plan")
    for word in argv:
        if word.startswith("-") and word != "--validate":
            fail(f"{word}: llm-plan takes key=value words, --validate (alone) or --help")


def layout_pinned(run: dict, overrides: list[str]) -> bool:
    """Whether the command line sets the layout (tp=, pp=, dp_replicate= or their parallel.* keys); the
    config's layout alone is a starting point, not a constraint."""
    keys = {word.lstrip("+").split("=", 1)[0] for word in overrides}
    return bool({"tp", "cp", "pp", "dp_replicate"} & run.keys()
                or {"parallel.tp", "parallel.cp", "parallel.pp", "parallel.dp_replicate"} & keys)


def preset_layout_misfit(train_cfg, gpus: int) -> bool:
    """Whether the config's dp_replicate x cp x tp x pp does not divide gpus, saying so (its layout is skipped and
    every layout of gpus planned)."""
    par = train_cfg.parallel
    size = par.dp_replicate * par.cp * par.tp * par.pp
    if gpus % size == 0:
        return False
    dims = (("dp_replicate", par.dp_replicate), ("cp", par.cp), ("tp", par.tp), ("pp", par.pp))
    layout = " x ".join(f"{k} {v}" for k, v in dims if v > 1)
    print(f"the config's layout ({layout} = {size} GPUs) does not divide {gpus:,} GPUs: planning every layout of "
          f"{gpus:,} GPUs instead (tp= and pp= plan one)")
    return True


def show_config_layout(run: dict, train_cfg, model_cfg, hw: Hardware, flags: dict) -> None:
    """The plan of the config's (or the command line's) layout in each AC mode."""
    layout = check_layout(run, train_cfg, model_cfg, hw)
    pipeline = check_pipeline(run, train_cfg, model_cfg, layout)
    for mode in ("none", "selective", "full"):
        show(train_cfg.model.preset, model_cfg, layout, train_cfg.data.seq_len,
             run.get("micro_batch", train_cfg.micro_batch_size), mode, hw, pipeline=pipeline,
             global_batch=train_cfg.global_batch_size, **flags)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
