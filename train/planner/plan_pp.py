"""Pipeline parallelism in the planner (train/planner/plan.py): how a schedule splits the layers over the ranks,
the bubble it leaves, the activations each rank keeps in flight, and the traffic between stages.

A step pushes m micro-batches through pp ranks, each holding v stages (virtual stages), in the schedules
of torch.distributed.pipelining. With t a rank's forward + backward of one micro-batch, a step takes
(m + bubble) x t of the slowest rank, bubble in units of t:
    GPipe, 1F1B              p - 1                    Huang et al. 2019; Narayanan et al. 2021, sec. 2.2.1
    Interleaved1F1B          (p - 1) / v              Narayanan et al. 2021, sec. 2.2.2
    InterleavedZeroBubble    (p - 1) (T_F + T_B - T_W) / t / v     ZB-H1 (Qi et al. 2023, sec. 2.1), over v
                             stages as interleaving divides 1F1B's (our assumption)
    ZBVZeroBubble            (p - 1) (T_F + T_B - 2 T_W) / t       ZB-H2's (sec. 2.2), assumed for ZB-V, which
                             reaches zero at 1F1B's memory when T_F = T_B = T_W (sec. 6)
The zero-bubble schedules split the backward into B (input gradient) and W (weight gradient), each as
long as the forward T_F; activation checkpointing adds its recomputation to B, the only part that cannot
fill a bubble. The device mesh puts pp outermost (torchtitan's order): a stage's neighbours are
dp_replicate x dp_shard x tp ranks away, on other nodes once that fills a node.
"""

from dataclasses import dataclass
from functools import cache

from model import ModelConfig

from .memory import GiB, estimate_stage_memory, stage_params, total_gib

SCHEDULES = ("1F1B", "Interleaved1F1B", "GPipe", "ZBVZeroBubble", "InterleavedZeroBubble")
LOOPED = ("Interleaved1F1B", "InterleavedZeroBubble")  # v >= 2 stages per rank, dealt round robin
ZERO_BUBBLE = ("ZBVZeroBubble", "InterleavedZeroBubble")  # torch refuses their split backward under compile


@dataclass(frozen=True)
class Pipeline:
    schedule: str = "1F1B"
    microbatches: int = 1  # per step and data-parallel rank: they replace gradient accumulation
    virtual_stages: int = 1  # stages per rank

    def __str__(self) -> str:
        v = f", {self.virtual_stages} stages per rank" if self.virtual_stages > 1 else ""
        return f"{self.schedule}, {self.microbatches} micro-batches{v}"


def pipeline_problem(pipe: Pipeline, pp: int, n_layers: int) -> str | None:
    """Why torch.distributed.pipelining (or an even split) refuses this pipeline, or None."""
    return stage_problem(pipe, pp, n_layers) or microbatch_problem(pipe, pp)


def stage_problem(pipe: Pipeline, pp: int, n_layers: int) -> str | None:
    """Why the schedule or its stages cannot be built, or None."""
    v = pipe.virtual_stages
    if pipe.schedule not in SCHEDULES:
        return f"pp_schedule={pipe.schedule} is not one of {', '.join(SCHEDULES)}"
    fixed = {"1F1B": 1, "GPipe": 1, "ZBVZeroBubble": 2}.get(pipe.schedule)
    if v != fixed if fixed else v < 2:
        wanted = f"virtual_stages={fixed}" if fixed else "virtual_stages >= 2"
        return f"virtual_stages={v}: {pipe.schedule} takes {wanted} (stages per rank)"
    if pp * v > n_layers:
        return f"pp={pp} x virtual_stages={v} stages exceed model.n_layers={n_layers}; lower pp or virtual_stages"
    return None


def microbatch_problem(pipe: Pipeline, pp: int) -> str | None:
    """Why torch refuses the schedule this many micro-batches per step, or None. No advice: the keys that set
    the count differ between the planner and the trainer (see microbatch_fixes)."""
    m = pipe.microbatches
    if pipe.schedule == "1F1B" and m < pp:
        return f"{m} micro-batches per step, fewer than pp={pp}, which 1F1B needs (torch refuses fewer)"
    rounds = max(1, m // pp)
    if pipe.schedule in LOOPED and m % rounds:
        return (f"{m} micro-batches per step, not a multiple of {rounds} (micro-batches // pp), which "
                f"{pipe.schedule} needs")
    return None


def microbatch_fixes(per_rank: int, micro_batch: int, pp: int) -> tuple[int | None, int]:
    """Changes that give a pipeline a multiple of pp micro-batches per step, a count every schedule takes, where
    each data-parallel rank has per_rank sequences a step in micro-batches of micro_batch: the largest smaller
    micro batch that does (None if none), and the smallest larger per-rank batch at this micro batch."""
    smaller = next((b for b in range(micro_batch - 1, 0, -1) if per_rank % b == 0 and per_rank // b % pp == 0), None)
    return smaller, (per_rank // micro_batch // pp + 1) * pp * micro_batch


def stage_layers(n_layers: int, stages: int) -> list[int]:
    """torchtitan's split: every stage n_layers // stages layers, the remainder one each to the middle
    stages from the second on (the first holds the embedding, the last the head and loss)."""
    base, extra = divmod(n_layers, stages)
    layers = [base + (0 < i <= extra) for i in range(stages - 1)]
    return layers + [n_layers - sum(layers)]


def rank_stages(rank: int, pp: int, pipe: Pipeline) -> list[int]:
    """The stages a rank runs: round robin (rank, rank + pp, ...), or a V for ZBV (rank, 2 pp - 1 - rank)."""
    if pipe.schedule == "ZBVZeroBubble":
        return [rank, 2 * pp - 1 - rank]
    return [rank + k * pp for k in range(pipe.virtual_stages)]


def in_flight(pipe: Pipeline, pp: int, rank: int) -> float:
    """Micro-batches of a rank's layers whose activations are alive at its peak. 1F1B: rank r runs
    pp - r forwards before its first backward; the interleaved schedules run (v-1) x (micro-batches per
    round) + 2 (pp - 1 - r) stage forwards, and one more, before theirs; ZB-V holds 1F1B's first-stage
    memory on every rank (Qi et al. 2023, sec. 6); GPipe holds all m."""
    m, v = pipe.microbatches, pipe.virtual_stages
    if pipe.schedule == "GPipe":
        return m
    if pipe.schedule == "1F1B":
        return min(m, pp - rank)
    if pipe.schedule == "ZBVZeroBubble":
        return min(m, pp)
    per_round = m // max(1, m // pp)
    return min(m * v, (v - 1) * per_round + 2 * (pp - 1 - rank) + 1) / v


def bubble_slots(pipe: Pipeline, pp: int, recompute: float) -> float:
    """Idle time per step in units of a rank's forward + backward of one micro-batch (module docstring).
    recompute: the forward work activation checkpointing repeats, as a share of one forward."""
    f, b, w = 1.0, 1.0 + recompute, 1.0  # T_F, T_B (with the recomputed forward), T_W
    share = {"Interleaved1F1B": 1 / pipe.virtual_stages,
             "InterleavedZeroBubble": (f + b - w) / (f + b + w) / pipe.virtual_stages,
             "ZBVZeroBubble": max(0.0, f + b - 2 * w) / (f + b + w)}
    return (pp - 1) * share.get(pipe.schedule, 1.0)


@cache
def ranks(n_layers: int, pp: int, pipe: Pipeline) -> tuple[tuple[int, bool, bool], ...]:
    """(layers, holds the embedding, holds the head) of every pipeline rank."""
    split = stage_layers(n_layers, pp * pipe.virtual_stages)
    held = [rank_stages(r, pp, pipe) for r in range(pp)]
    return tuple((sum(split[s] for s in stages), 0 in stages, len(split) - 1 in stages) for stages in held)


def bandwidth(ranks_spanned: int, hw) -> float:
    """Bytes/s per GPU of a group whose ranks lie within ranks_spanned consecutive GPUs."""
    return 1e9 * (hw.intra_node_gbs if ranks_spanned <= hw.gpus_per_node else hw.inter_node_gbs)


def fsdp_seconds(params: float, layout, hw) -> tuple[float, float]:
    """(all-gather, reduction) of a rank's params (already split over tp) once per step: under PP FSDP
    gathers at the first forward and keeps the weights gathered, and reduce-scatters (HSDP: also
    all-reduces) the fp32 gradients after the last backward, when no compute is left to hide it."""
    shard, replicas = layout.fsdp_shard, layout.dp_replicate  # FSDP shards over dp_shard x cp
    within = bandwidth(shard * layout.tp, hw)
    gather = 2 * params * (shard - 1) / shard / within
    across = bandwidth(replicas * shard * layout.tp, hw)
    reduce = 4 * params * (shard - 1) / shard / within + 4 * params / shard * 2 * (replicas - 1) / replicas / across
    return gather, reduce


def p2p_seconds(model_cfg: ModelConfig, layout, pipe: Pipeline, tokens: int, hw) -> tuple[float, float]:
    """(bytes a rank sends per step, exposed seconds). Each stage boundary carries a micro-batch's bf16
    (tokens x dim) activations forward and their gradient backward, each TP rank its sequence shard.
    Steady-state transfers overlap compute; the fill and the drain wait for one per boundary."""
    boundary = tokens * model_cfg.dim * 2 / (layout.tp * layout.cp)  # each CP rank sends its seq_len / cp
    stride = layout.dp_replicate * layout.dp_shard * layout.tp
    one = boundary / bandwidth(stride * (layout.pp - 1) + 1, hw)
    sent = 2 * pipe.microbatches * pipe.virtual_stages * boundary
    return sent, 2 * (layout.pp * pipe.virtual_stages - 1) * one


def worst_ranks(shapes: tuple[tuple[int, bool, bool], ...]) -> list[int]:
    """The ranks that can hold the most memory and parameters: in-flight activations fall with the rank,
    so the first (embedding), the second, the first with the most layers, and the last (head and loss)."""
    most = max(range(len(shapes)), key=lambda r: shapes[r][0])
    return sorted({0, min(1, len(shapes) - 1), most, len(shapes) - 1})


def stage_memory(model_cfg: ModelConfig, layout, pipe: Pipeline, micro_batch: int, seq_len: int, ac_mode: str,
                 ac_every: int, shapes: tuple) -> dict[int, dict]:
    """Peak bytes by kind of the ranks that can hold the most (worst_ranks). Under CP each rank holds seq_len / cp
    tokens of a micro-batch (its mask and gathered K/V are not counted here)."""
    return {r: estimate_stage_memory(model_cfg, micro_batch, seq_len // layout.cp, layout.fsdp_shard, ac_mode, 2,
                                     ac_every, layout.tp, shapes[r][0], in_flight(pipe, layout.pp, r), shapes[r][1],
                                     shapes[r][2], pipe.virtual_stages)
            for r in worst_ranks(shapes)}


def plan_pipeline(model_cfg: ModelConfig, layout, pipe: Pipeline, micro_batch: int, seq_len: int, ac_mode: str, hw,
                  seconds: dict, recompute: float, ac_every: int = 2) -> dict:
    """Memory of the fullest rank and tokens/s per GPU for a pipelined layout. seconds: the whole model's
    compute ("compute", "head": its output head's part) and exposed TP and CP time ("tp") for one micro-batch."""
    shapes = ranks(model_cfg.n_layers, layout.pp, pipe)
    per_layer = (seconds["compute"] - seconds["head"] + seconds["tp"]) / model_cfg.n_layers
    slowest = max(layers * per_layer + seconds["head"] * last for layers, _, last in shapes)
    pipeline_s = (pipe.microbatches + bubble_slots(pipe, layout.pp, recompute)) * slowest
    tokens = micro_batch * seq_len
    sent, p2p_s = p2p_seconds(model_cfg, layout, pipe, tokens, hw)
    params = max(stage_params(model_cfg, *shapes[r]) for r in worst_ranks(shapes)) / layout.tp
    gather, reduce = fsdp_seconds(params, layout, hw)
    forward = slowest / (3 + recompute)  # the first micro-batch's forward hides the all-gather
    fsdp_s = max(0.0, gather - forward) + (1 - hw.overlap) * min(gather, forward) + reduce
    step_s = pipeline_s + p2p_s + fsdp_s
    mem = stage_memory(model_cfg, layout, pipe, micro_batch, seq_len, ac_mode, ac_every, shapes)
    worst = max(mem, key=lambda r: total_gib(mem[r]))
    return {
        "memory_gib": {k: v / GiB for k, v in mem[worst].items()},
        "total_gib": total_gib(mem[worst]),
        "fits": total_gib(mem[worst]) <= hw.memory_gib,
        "stage_gib": {r: total_gib(e) for r, e in mem.items()},
        "compute_s": slowest, "bubble": 1 - pipe.microbatches * slowest / pipeline_s,
        "p2p_s": p2p_s, "p2p_bytes": sent, "comm_s": fsdp_s, "step_s": step_s,
        "tokens_per_s_per_gpu": pipe.microbatches * tokens / step_s / (layout.tp * layout.cp * layout.pp),
    }


def pipelines(layout, micro_batch: int, seq_len: int, max_global_tokens: int, n_layers: int,
              global_batch: int | None = None) -> list[Pipeline]:
    """The schedules the recommender tries at a PP layout, simplest first: 1F1B, ZBV, and the interleaved
    ones with 2, 4 and 8 stages per rank; GPipe is left out (1F1B's bubble with all m micro-batches alive).
    Micro-batches replace gradient accumulation: global_batch (sequences) / (data-parallel ranks x
    micro_batch) of them; without a global batch, the most (a multiple of pp) that max_global_tokens allows.
    Empty where the global batch does not split so or exceeds max_global_tokens."""
    data = layout.dp_replicate * layout.dp_shard
    if global_batch is None:
        m = max_global_tokens // (data * micro_batch * seq_len) // layout.pp * layout.pp
    elif global_batch % (data * micro_batch) or global_batch * seq_len > max_global_tokens:
        return []
    else:
        m = global_batch // (data * micro_batch)
    tried = [Pipeline("1F1B", m), Pipeline("ZBVZeroBubble", m, 2)]
    tried += [Pipeline(schedule, m, v) for schedule in LOOPED for v in (2, 4, 8)]
    return [pipe for pipe in tried if m >= layout.pp and pipeline_problem(pipe, layout.pp, n_layers) is None]


def plan_options(layout, micro_batch: int, seq_len: int, max_global_tokens: int, n_layers: int, run: dict,
                 global_batch: int | None = None) -> list[dict]:
    """train.planner.plan.plan's options to try at a layout: run itself, or under PP each schedule of pipelines (the
    zero-bubble ones without compile, which torch refuses for them)."""
    if run.get("cpu_offload") and layout.pp > 1:
        return []  # the trainer refuses parallel.cpu_offload under PP (train/config.py ParallelSection.check)
    if layout.pp == 1:  # the trainer accumulates gradients up to the global batch, a multiple of this
        data = layout.dp_replicate * layout.dp_shard
        if global_batch and global_batch % (data * micro_batch):
            return []
        steps = (global_batch or data * micro_batch) // (data * micro_batch)
        return [{**run, "accumulation": steps} if run.get("cpu_offload") else run]
    return [{**run, "pipeline": pipe, "compile": run.get("compile", True) and pipe.schedule not in ZERO_BUBBLE}
            for pipe in pipelines(layout, micro_batch, seq_len, max_global_tokens, n_layers, global_batch)]
