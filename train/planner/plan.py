"""A memory and throughput planner: per-GPU memory by kind and expected tokens/s for a preset on N
GPUs laid out as dp_replicate x dp_shard x cp x tp x pp, from the config alone. Assumptions are printed with
every plan.

Time per micro-batch = compute (the step's FLOPs, including recomputation, split over the tp ranks, at
a calibrated fraction of the GPU's peak) + the exposed part of tensor parallelism's per-block
collectives (train/planner/plan_tp.py) + the FSDP/HSDP communication that compute does not hide. Under
pipeline parallelism (pp > 1) train/planner/plan_pp.py turns a micro-batch's time into a step's: its schedule's
bubble, the traffic between stages, and FSDP once a step. Under context parallelism (cp > 1)
train/planner/plan_cp.py adds its K/V collectives and the attention work of its dense mask; each of a CP group's
GPUs computes 1/cp of the micro-batch.
"""

from dataclasses import dataclass
from functools import cache
from math import isqrt, log2

from model import ModelConfig, flops_per_token, num_params, preset

from .memory import GiB, estimate_memory, estimate_offload_memory, host_state_bytes, total_gib
from .plan_cp import attention_share, cp_problem, cp_seconds
from .plan_pp import Pipeline, plan_options, plan_pipeline
from .plan_tp import async_tp_share, split_problem, tp_seconds


@dataclass
class Hardware:
    """Every constant that moves a prediction, with its source: a datasheet, a paper, a measurement (which, where),
    or "calibrated on the calibration set" (launch/plan.py CALIBRATION: torchtitan's published H100 runs); none is
    set from the held-out runs (launch/plan.py HELD_OUT) that `llm-plan --validate` judges it on."""
    peak_tflops: float = 989.0  # dense bf16 per GPU: H100 SXM datasheet (989.4 TFLOP/s without sparsity)
    memory_gib: float = 79.2  # usable per GPU of an H100 80 GB (datasheet 80 GB; the CUDA context off, assumed)
    # Fraction of peak (MFU) the compiled model reaches on one GPU: measured with this trainer on our H100 (700 W,
    # HBM3): Llama-3-8B layer shape, 1 x 8192, selective AC, compile -> 55.4% MFU. Measured with selective AC on:
    # efficiency_recompute says so, and plans divide that recompute out so that each AC mode counts its own once.
    efficiency: float = 0.554
    efficiency_recompute: float = 0.04  # the recompute (share of one forward) `efficiency` ran with
    no_compile_factor: float = 0.86  # eager vs compiled: calibrated on the calibration set (5,762 / 6,667, 8B)
    # Sustained clocks relative to 700 W; torchtitan's 500 W runs are planned at 0.8, calibrated on the calibration set
    # (launch/plan.py TORCHTITAN_H100).
    power_factor: float = 1.0
    # Speed-up of the blocks' matmuls under float8 (tensorwise) at Llama 3.1 8B's shape (wider models gain
    # more: float8_speedup_for): calibrated on the calibration set, what makes torchtitan's 8B step 1.28x faster
    # (8,532 vs 6,667 tokens/s, 8 H100s, compile, selective AC), where those matmuls are 81% of the work.
    float8_speedup: float = 1.37
    float8_gemm_ratio: float = 2.0  # float8 vs bf16 dense peak: H100 SXM datasheet (1,979 vs 989 TFLOP/s)
    gpus_per_node: int = 8  # HGX H100 / DGX H100: 8 GPUs on NVLink
    # Achieved NCCL all-gather / reduce-scatter bus bandwidth over NVLink: 350-360 GB/s on 8 H100s, an
    # independent measurement (NVIDIA/nccl#1281, nccl-tests); NVLink 4's 450 GB/s per direction is the ceiling.
    intra_node_gbs: float = 350.0
    inter_node_gbs: float = 50.0  # per GPU across nodes: 400 Gb/s RDMA per GPU (ConnectX-7 datasheet)
    # Latency of a ring all-gather / reduce-scatter over n ranks on N nodes: base + (n - N) intra-node steps + (N - 1)
    # network steps (alpha of alpha + bytes / bandwidth), NCCL's own model for its Ring/Simple protocol
    # (NVIDIA/nccl src/graph/tuning.cc, ncclTopoTuneModel: baseLat 8.4 us, hwLat NVLink 3.4 us, NET 14 us a step).
    collective_base_us: float = 8.4
    intra_node_latency_us: float = 3.4
    inter_node_latency_us: float = 14.0
    # Share of FSDP communication hidden under compute: assumed (FSDP2 prefetches the next block's all-gather; the
    # first gather and the last reduce-scatter wait); the calibration set's FSDP-only rows agree with it.
    overlap: float = 0.95
    # Share of TP's collective time the GPU waits for, derived: each all-gather feeds the matmul after it and each
    # reduce-scatter the norm after it; only the backward's 2 reduce-scatters of input gradients overlap the
    # weight-gradient matmuls (2 of 12 collectives per block under full AC, of 8 without: 0.83 and 0.75).
    tp_exposed: float = 0.8
    # Async TP splits each collective matmul into tp pieces and overlaps all but the first with the matmul it
    # feeds: at least 1/tp of each collective (this, at tp 8), and what that matmul is too short to hide
    # (plan_tp.async_tp_seconds).
    async_tp_exposed: float = 0.125
    # parallel.cpu_offload (offload_seconds). Host <-> GPU over PCIe 5 x16: 32 GT/s x 16 lanes with 128b/130b
    # coding is 63 GB/s per direction; pinned copies reach about 80% of it (assumed, as NVIDIA's bandwidthTest
    # reports for PCIe links); each GPU has its own x16 link (as in an HGX H100 node).
    pcie_gbs: float = 50.0
    # Host memory bandwidth the CPU's memory-bound fp32 kernels (fused AdamW, the gradient accumulation) reach in
    # a node, shared by its ranks: assumed a quarter of a dual-socket DDR5 server's ~400 GB/s peak (2 x 8 channels
    # x 4800 MT/s x 8 B = 614 GB/s raw). Not measured: benchmarks/gpu_check.py's cpu_offload case times a step.
    host_gbs: float = 100.0
    # Context parallelism (train/planner/plan_cp.py): attention's time under its mask, per the causal kernels' the
    # efficiency was measured with. 1.0: on CUDA its mask is flex attention's BlockMask, which skips the tiles no
    # query may see as a causal kernel does; 2.0 would be SDPA's dense additive mask (the CPU's), every tile done.
    cp_mask_attention: float = 1.0
    # Share of the K/V all-gathers and their reduce-scatters the GPU waits for: all of it. The all-gather feeds the
    # attention right after it and its reduce-scatter the k/v projections' backward; nothing is scheduled to
    # overlap them yet (torchtitan's ring attention overlaps its K/V passes with attention).
    cp_exposed: float = 1.0


@dataclass(frozen=True)
class Layout:
    """GPUs = pp x dp_replicate x dp_shard x cp x tp, tp innermost (a TP group is tp consecutive ranks), cp next
    (a CP group is cp x tp consecutive ranks), pp outermost (a stage's neighbours are dp_replicate x dp_shard x cp x
    tp ranks away). FSDP shards over dp_shard x cp."""
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1

    @property
    def gpus(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp * self.pp

    @property
    def fsdp_shard(self) -> int:
        """The ranks FSDP shards the weights over: the cp ranks of a sequence hold one model between them."""
        return self.dp_shard * self.cp

    def __str__(self) -> str:  # e.g. "dp_replicate 2 x dp_shard 4 x tp 8", leaving out the dims of size 1
        text = f"dp_shard {self.dp_shard}"
        if self.dp_replicate > 1:
            text = f"dp_replicate {self.dp_replicate} x {text}"
        text = f"{text} x cp {self.cp}" if self.cp > 1 else text
        text = f"{text} x tp {self.tp}" if self.tp > 1 else text
        return f"{text} x pp {self.pp}" if self.pp > 1 else text


# Extra forward work, as a share of one forward. This trainer's selective AC (train/parallel/parallelize.py) keeps
# every matmul and attention output and recomputes the norms, activations and rope: few FLOPs, memory-bound time,
# assumed 4% of a forward (not measured apart from the efficiency it was measured with).
RECOMPUTE = {"none": 0.0, "selective": 0.04, "full": 1.0}
# torchtitan's selective AC ("op", torchtitan/models/llama3/parallelize_llama.py _custom_policy, unchanged from its
# Dec 2024 runs through commits 820504e and e7c0cae of June 2025): saves matmul, attention and reduce-scatter outputs
# except every second mm, so a block's k, o and w3 (the 2nd, 4th and 6th of q, k, v, o, w1, w3, w2) are recomputed,
# and with them the TP all-gathers: 36-37% of the blocks' forward matmul FLOPs at Llama 3's shapes.
SAC_POLICIES = ("trainer", "torchtitan")


def recompute_share(ac_mode: str, n_layers: int, ac_every: int, model_cfg: ModelConfig | None = None,
                    sac: str = "trainer", seq_len: int = 8192) -> float:
    """Forward work recomputed per step, a share of one forward; sac: whose selective AC policy (SAC_POLICIES)."""
    if ac_mode == "every_k":
        return ((n_layers + ac_every - 1) // ac_every) / n_layers
    if ac_mode == "selective" and sac == "torchtitan":
        return RECOMPUTE["selective"] + every_other_mm_share(model_cfg) * 6 * block_params(model_cfg) / \
            flops_per_token(model_cfg, seq_len)
    return RECOMPUTE[ac_mode]


def every_other_mm_share(model_cfg: ModelConfig) -> float:
    """The share of a block's matmul FLOPs in its 2nd, 4th and 6th matmul (k, o, w3): torchtitan's recomputed ones."""
    d, f, kv = model_cfg.dim, model_cfg.hidden_dim, model_cfg.kv_heads * model_cfg.head_dim
    sizes = (d * d, d * kv, d * kv, d * d, d * f, d * f, f * d)  # q, k, v, o, w1, w3, w2
    return sum(sizes[1::2]) / sum(sizes)


def block_params(model_cfg: ModelConfig) -> int:
    """The blocks' matmul weights (all parameters but the embedding and the output head)."""
    return num_params(model_cfg, exclude_embedding=True) - model_cfg.vocab_size * model_cfg.dim


def step_flops_factor(ac_mode: str, n_layers: int, ac_every: int, model_cfg: ModelConfig | None = None,
                      sac: str = "trainer", seq_len: int = 8192) -> float:
    """Compute relative to forward + backward without recomputation (forward = 1/3 of the work)."""
    return 1 + recompute_share(ac_mode, n_layers, ac_every, model_cfg, sac, seq_len) / 3


def block_matmul_share(model_cfg: ModelConfig, seq_len: int) -> float:
    """The blocks' matmuls as a share of the work, counting attention at the half its causal kernels do
    (float8 speeds up these alone: attention and the output head stay bf16)."""
    attention = 12 * model_cfg.n_layers * model_cfg.n_heads * model_cfg.head_dim * seq_len
    blocks = 6 * block_params(model_cfg)  # all but the output head
    return blocks / (flops_per_token(model_cfg, seq_len) - attention / 2)


def cast_share(model_cfg: ModelConfig) -> float:
    """A block's float8 casting per unit of matmul work: a linear (K in, N out) casts its input and output
    gradient, tokens x (K + N) elements, for tokens x K x N of matmul (TP splits both alike: the casts run
    on sequence shards before the collectives). Casting is memory-bound, so wider models gain more."""
    d, f, kv = model_cfg.dim, model_cfg.hidden_dim, model_cfg.kv_heads * model_cfg.head_dim
    shapes = ((d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d))  # q, k, v, o, w1, w3, w2
    return sum(k + n for k, n in shapes) / sum(k * n for k, n in shapes)


def float8_speedup_for(model_cfg: ModelConfig, hw: Hardware) -> float:
    """Gemms float8_gemm_ratio x faster, plus casting in proportion to cast_share, sized at 8B's speed-up."""
    overhead_8b = 1 / hw.float8_speedup - 1 / hw.float8_gemm_ratio
    return 1 / (1 / hw.float8_gemm_ratio + overhead_8b * cast_share(model_cfg) / CAST_SHARE_8B)


CAST_SHARE_8B = cast_share(preset("8b"))


# The share of the best bf16 matmul rate an H100 reaches in one GEMM of F GFLOP: the median over the shapes of that size
# in XLA's published matmul performance table (openxla/xla xla/service/gpu/model/matmul_interpolator_data.h, "sm_90",
# bf16 x bf16 -> bf16, batch 1, m, n, k from 256 to 4,096; read at ROCm/xla ea2c45f, Jul 2026), log-interpolated.
# Small GEMMs (narrow TP shards of a short micro-batch) leave SMs idle and pay launch and tail time.
GEMM_CURVE = ((1, 0.18), (2, 0.30), (4, 0.44), (8, 0.61), (16, 0.82), (32, 0.95), (64, 0.96), (128, 1.0))


def gemm_share(gflop: float) -> float:
    """GEMM_CURVE at gflop: the share of the best matmul rate a GEMM this size reaches."""
    if gflop <= GEMM_CURVE[0][0]:
        return GEMM_CURVE[0][1] * gflop / GEMM_CURVE[0][0]
    for (f0, s0), (f1, s1) in zip(GEMM_CURVE, GEMM_CURVE[1:]):
        if gflop <= f1:
            return s0 + (s1 - s0) * log2(gflop / f0) / log2(f1 / f0)
    return 1.0


def matmul_slowdown(model_cfg: ModelConfig, tokens: int, tp: int) -> float:
    """A block's matmul time at its per-rank GEMM sizes over that at the best rate: sum of F / gemm_share(F) over sum
    of F, for q, k, v, o, w1, w3, w2 on a TP group's (sequence-gathered) tokens, each split tp ways. The forward's
    and both backward GEMMs of a linear do the same FLOPs, so the forward's stand for all three."""
    d, f, kv = model_cfg.dim, model_cfg.hidden_dim, model_cfg.kv_heads * model_cfg.head_dim
    gflops = [2 * tokens * k * n / tp / 1e9 for k, n in ((d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d))]
    return sum(g / gemm_share(g) for g in gflops) / sum(gflops)


# The shape every efficiency here was measured at (Llama-3-8B layers, 1 x 8192 on one GPU): its GEMMs set the rate.
MEASURED_SLOWDOWN = matmul_slowdown(preset("tt_8b_l8"), 8192, 1)


def compute_seconds(model_cfg: ModelConfig, tokens: int, seq_len: int, ac_mode: str, hw: Hardware, compile: bool,
                    float8: bool, tp: int, ac_every: int, cp: int = 1, sac: str = "trainer") -> float:
    """One GPU's compute for a micro-batch of `tokens` shared by its tp x cp ranks (CP's balanced split gives each
    1/cp of the causal work; its mask costs attention hw.cp_mask_attention times the causal kernels' time). The
    recompute hw.efficiency was measured with (hw.efficiency_recompute) is divided out: each mode's counts once."""
    rate = flops_rate(hw, compile)  # of the FLOPs it ran, the recompute it was measured with included
    per_token = flops_per_token(model_cfg, seq_len)
    flops = tokens * per_token * step_flops_factor(ac_mode, model_cfg.n_layers, ac_every, model_cfg, sac, seq_len)
    masked = flops * attention_share(model_cfg, seq_len, per_token) * (hw.cp_mask_attention - 1) if cp > 1 else 0.0
    # The blocks' matmuls: float8's speed-up, and their GEMM sizes against the measured shape's (GEMM_CURVE).
    share, slowdown = block_matmul_share(model_cfg, seq_len), matmul_slowdown(model_cfg, tokens // cp, tp)
    speedup = float8_speedup_for(model_cfg, hw) if float8 else 1.0
    flops *= 1 - share + share * slowdown / MEASURED_SLOWDOWN / speedup
    return (flops + masked) / (tp * cp) / rate


def flops_rate(hw: Hardware, compile: bool) -> float:
    """FLOP/s one GPU runs (recompute included) in bf16."""
    rate = hw.peak_tflops * 1e12 * hw.efficiency * hw.power_factor * (1 if compile else hw.no_compile_factor)
    return rate * (1 + hw.efficiency_recompute / 3)


def tp_async_exposed(model_cfg: ModelConfig, tp: int, hw: Hardware, compile: bool, float8: bool) -> float:
    """The share of TP's collective time async TP leaves exposed, its matmuls at this GPU's rate (float8's faster)."""
    rate = flops_rate(hw, compile) * (float8_speedup_for(model_cfg, hw) if float8 else 1)
    return async_tp_share(model_cfg, tp, hw, float8, rate)


def dp_seconds(model_cfg: ModelConfig, layout: Layout, hw: Hardware) -> float:
    """FSDP per micro-batch: bf16 all-gather in the forward and again in the backward, fp32 reduce-scatter,
    of this rank's 1/tp of the weights over dp_shard (x cp); HSDP adds an fp32 all-reduce of the shard's gradients
    over dp_replicate. A group that spans nodes runs at the network's bandwidth. Each collective also pays its ring's
    latency (ring_latency), per block: FSDP gathers and reduces each block apart."""
    n = num_params(model_cfg) / layout.tp
    shard, replicas = layout.fsdp_shard, layout.dp_replicate
    within = hw.intra_node_gbs if shard * layout.tp <= hw.gpus_per_node else hw.inter_node_gbs
    seconds = (2 + 2 + 4) * n * (shard - 1) / shard / (within * 1e9)
    across = hw.intra_node_gbs if layout.gpus <= hw.gpus_per_node else hw.inter_node_gbs
    seconds += 4 * n / shard * 2 * (replicas - 1) / replicas / (across * 1e9)
    inner = layout.tp * layout.cp  # consecutive ranks between two of an FSDP group
    latency = 3 * ring_latency(shard, inner, hw) + 2 * ring_latency(replicas, inner * shard, hw)
    return seconds + (model_cfg.n_layers + 1) * latency if shard * replicas > 1 else seconds


def ring_latency(ranks: int, stride: int, hw: Hardware) -> float:
    """Seconds of latency of a ring all-gather or reduce-scatter over `ranks` GPUs `stride` ranks apart: NCCL's
    model (Hardware.collective_base_us), a step per rank, the steps between nodes at the network's latency."""
    if ranks == 1:
        return 0.0
    nodes = min(ranks, max(1, ranks * stride // hw.gpus_per_node))
    return 1e-6 * (hw.collective_base_us + (ranks - nodes) * hw.intra_node_latency_us
                   + (nodes - 1) * hw.inter_node_latency_us)


def offload_seconds(model_cfg: ModelConfig, layout: Layout, hw: Hardware, accumulation: int) -> dict[str, float]:
    """parallel.cpu_offload's time per micro-batch, with a step of `accumulation` micro-batches. FSDP copies the
    rank's fp32 shard of each block to the GPU for the forward and again for the backward (it reshards after
    the forward), 8 bytes a parameter, and its fp32 gradient shard back, 4 bytes, in the other direction. The
    micro-batches after a step's first add their gradients to the host's (FSDP copies them back blocking, then
    the CPU adds: read 8, write 4 bytes a parameter), and once a step the fused AdamW on the CPU reads the
    parameter, gradient and two moments and writes three (28 bytes a parameter); the node's ranks share the
    host's bandwidth. Returns pcie_s (overlapped with compute as FSDP's traffic is), host_s (exposed:
    the blocking copies and the adds per micro-batch, the optimizer step's share)."""
    n = num_params(model_cfg) / layout.tp / layout.fsdp_shard  # this rank's shard (HSDP's replicas hold the same)
    per_node = min(layout.gpus, hw.gpus_per_node)
    add_s = 4 * n / (hw.pcie_gbs * 1e9) + 12 * n * per_node / (hw.host_gbs * 1e9)
    optimizer_s = 28 * n * per_node / (hw.host_gbs * 1e9)
    return {"pcie_s": 8 * n / (hw.pcie_gbs * 1e9), "host_s": add_s * (accumulation - 1) / accumulation
            + optimizer_s / accumulation, "optimizer_s": optimizer_s}


def exposed_seconds(comm_s: float, compute_s: float, hw: Hardware) -> float:
    """The part of comm_s that compute_s does not hide (hw.overlap of what it could)."""
    return max(0.0, comm_s - compute_s) + (1 - hw.overlap) * min(comm_s, compute_s)


def plan(model_cfg: ModelConfig, layout: Layout, micro_batch: int, seq_len: int, ac_mode: str, hw: Hardware,
         compile: bool = True, ac_every: int = 2, float8: bool = False, async_tp: bool = False,
         pipeline: Pipeline | None = None, cpu_offload: bool = False, accumulation: int = 1,
         sac: str = "trainer") -> dict:
    """Memory (GiB by kind) and tokens/s per GPU; pipeline: the schedule if layout.pp > 1 (default 1F1B);
    cpu_offload: parallel.cpu_offload, its step of `accumulation` micro-batches (offload_seconds; then also
    host_gib, the host memory per GPU, and offload_share, the step time offloading adds); sac: whose selective AC
    policy (SAC_POLICIES: "torchtitan" plans torchtitan's runs)."""
    tokens = micro_batch * seq_len  # one micro-batch of one TP x CP group, shared by its tp x cp GPUs
    cp = layout.cp
    compute_s = compute_seconds(model_cfg, tokens, seq_len, ac_mode, hw, compile, float8, layout.tp, ac_every, cp,
                                sac)
    tp_s = tp_seconds(model_cfg, tokens // cp, ac_mode, ac_every, layout.tp, hw, float8)  # a CP rank's tokens
    tp_exposed = tp_s * (tp_async_exposed(model_cfg, layout.tp, hw, compile, float8) if async_tp else hw.tp_exposed)
    if layout.pp > 1:
        bf16_s = compute_seconds(model_cfg, tokens, seq_len, ac_mode, hw, compile, False, layout.tp, ac_every, cp, sac)
        head_flops = 6 * model_cfg.vocab_size * model_cfg.dim
        head_s = bf16_s * head_flops / flops_per_token(model_cfg, seq_len)  # the head stays bf16
        cp_s = cp_seconds(model_cfg, micro_batch, seq_len, ac_mode, ac_every, layout, hw) * hw.cp_exposed
        seconds = {"compute": compute_s, "head": head_s, "tp": tp_exposed + cp_s}
        recompute = recompute_share(ac_mode, model_cfg.n_layers, ac_every, model_cfg, sac, seq_len)
        return {**plan_pipeline(model_cfg, layout, pipeline or Pipeline("1F1B", layout.pp), micro_batch, seq_len,
                                ac_mode, hw, seconds, recompute, ac_every), "tp_s": tp_s}
    if cpu_offload:
        mem = estimate_offload_memory(model_cfg, micro_batch, seq_len, ac_mode, 2, ac_every, tp=layout.tp, cp=cp)
    else:
        mem = estimate_memory(model_cfg, micro_batch, seq_len, layout.fsdp_shard, ac_mode, 2, ac_every, tp=layout.tp,
                              cp=cp)
    comm_s = dp_seconds(model_cfg, layout, hw)
    cp_s = cp_seconds(model_cfg, micro_batch, seq_len, ac_mode, ac_every, layout, hw)
    seconds = compute_s + tp_exposed + cp_s * hw.cp_exposed + exposed_seconds(comm_s, compute_s, hw)
    found = {"memory_gib": {k: v / GiB for k, v in mem.items()}, "total_gib": total_gib(mem),
             "fits": total_gib(mem) <= hw.memory_gib, "compute_s": compute_s, "tp_s": tp_s, "comm_s": comm_s,
             "cp_s": cp_s}
    if cpu_offload:
        offload = offload_seconds(model_cfg, layout, hw, accumulation)
        added = exposed_seconds(offload["pcie_s"], compute_s, hw) + offload["host_s"]
        found.update(offload, host_gib=host_state_bytes(model_cfg, layout.fsdp_shard, layout.tp) / GiB,
                     offload_share=added / (seconds + added))
        seconds += added
    return {**found, "tokens_per_s_per_gpu": tokens / (layout.tp * cp) / seconds}


@cache
def divisors(n: int) -> list[int]:
    """The divisors of n, ascending: sqrt(n) trials, not n (a billion GPUs take a fraction of a second)."""
    small = [d for d in range(1, isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def layouts(model_cfg: ModelConfig, gpus: int, seq_len: int, hw: Hardware, cp: int = 1) -> list[Layout]:
    """Every dp_replicate x dp_shard x cp x tp x pp of `gpus` at this cp with tp a power of two within a node that
    splits the model evenly and pp a power of two up to the layers, simplest first (smaller pp, then smaller tp,
    then fewer replicas)."""
    found, pp = [], 1
    while pp <= min(gpus, model_cfg.n_layers):
        tp = 1
        while tp <= min(gpus // (pp * cp), hw.gpus_per_node):
            split = gpus % (tp * pp * cp) == 0 and split_problem(model_cfg, seq_len, tp) is None
            if split and cp_problem(seq_len, cp, tp) is None:
                data = gpus // (tp * pp * cp)
                found += [Layout(r, data // r, tp, pp, cp) for r in divisors(gpus) if data % r == 0]
            tp *= 2
        pp *= 2
    return found


def faster(a: dict, b: dict) -> bool:
    """Whether plan a beats plan b by more than the model's noise (1%)."""
    return a["tokens_per_s_per_gpu"] > b["tokens_per_s_per_gpu"] * 1.01


def best_for_layout(model_cfg: ModelConfig, layout: Layout, seq_len: int, hw: Hardware, max_global_tokens: int,
                    max_micro_batch: int = 16, global_batch: int | None = None, **run) -> dict | None:
    """The fastest (AC mode, micro batch, PP schedule) that fits at this layout and whose smallest global
    batch (one micro-batch per data-parallel rank; under PP all its micro-batches, plan_pp.pipelines) is at
    most max_global_tokens: lighter AC and smaller batches first. run: plan's compile, float8, async_tp."""
    best, data_ranks = None, layout.dp_replicate * layout.dp_shard
    for ac in ("none", "selective", "full"):
        for mb in range(1, max_micro_batch + 1):
            if data_ranks * mb * seq_len > max_global_tokens:
                break
            options = plan_options(layout, mb, seq_len, max_global_tokens, model_cfg.n_layers, run, global_batch)
            plans = [(p, o) for o in options if (p := plan(model_cfg, layout, mb, seq_len, ac, hw, **o))["fits"]]
            for p, o in plans:
                if best is None or faster(p, best):
                    m = o["pipeline"].microbatches if "pipeline" in o else 1
                    best = {**p, "layout": layout, "micro_batch": mb, "ac": ac, "pipeline": o.get("pipeline"),
                            "compile": o.get("compile", True), "min_global_tokens": data_ranks * mb * m * seq_len}
            if options and (not plans or layout.pp > 1):
                break  # a larger micro-batch needs more memory; under PP it also leaves fewer micro-batches
    return best


# Windows from which context parallelism is worth planning even where a layout fits without it: 32K, the first of the
# long-context stages that Llama 3 extended its 8K context through with context parallelism (the paper, sec. 3.4.2
# and 3.3.2); below it activations and attention are small enough that data parallelism does better.
LONG_WINDOW = 32768


def recommend(model_cfg: ModelConfig, gpus: int, seq_len: int, hw: Hardware, max_global_tokens: int = 2**24,
              global_batch: int | None = None, **run) -> tuple[dict | None, list[dict]]:
    """The recommended plan (None: nothing fits) and the best plan of every layout that has one. The
    recommendation is the fastest, a more complex layout only where it is 1% faster. global_batch: the
    sequences per step, which a layout's smallest global batch must divide and PP splits into micro-batches
    (None: any; PP then takes as many as max_global_tokens allows). Layouts with cp = 2, 4, ... up to gpus
    (cp_degrees) follow those without, smaller cp first, for long windows (LONG_WINDOW) or where nothing fits
    without context parallelism."""
    plans = plans_at(model_cfg, gpus, seq_len, hw, 1, max_global_tokens, global_batch, run)
    if not plans or seq_len >= LONG_WINDOW:
        plans += [p for cp in cp_degrees(gpus, seq_len)
                  for p in plans_at(model_cfg, gpus, seq_len, hw, cp, max_global_tokens, global_batch, run)]
    return pick(plans), plans


def plans_at(model_cfg: ModelConfig, gpus: int, seq_len: int, hw: Hardware, cp: int, max_global_tokens: int,
             global_batch: int | None, run: dict) -> list[dict]:
    """The best plan of every layout of `gpus` at this cp that has one."""
    return [p for layout in layouts(model_cfg, gpus, seq_len, hw, cp)
            if (p := best_for_layout(model_cfg, layout, seq_len, hw, max_global_tokens, global_batch=global_batch,
                                     **run))]


def cp_degrees(gpus: int, seq_len: int) -> list[int]:
    """The context-parallel degrees the recommender tries (long windows, or nothing fits without): powers of 2 up to
    whose 2 x cp chunks split the window."""
    return [2**k for k in range(1, gpus.bit_length()) if gpus % 2**k == 0 and seq_len % 2 ** (k + 1) == 0]


def why_no_plan(model_cfg: ModelConfig, layout: Layout, seq_len: int, max_global_tokens: int, global_batch: int | None,
                **run) -> str:
    """Why best_for_layout finds no plan at a layout: "tokens" (one micro-batch per data-parallel rank, or under
    PP the global batch, exceeds max_global_tokens), "batch" (global_batch does not split into data-parallel ranks
    x micro batch, or under PP into micro-batches a schedule takes), else "memory"."""
    data = layout.dp_replicate * layout.dp_shard
    if data * seq_len > max_global_tokens or (layout.pp > 1 and (global_batch or 0) * seq_len > max_global_tokens):
        return "tokens"
    for mb in range(1, 17):
        if data * mb * seq_len <= max_global_tokens and plan_options(layout, mb, seq_len, max_global_tokens,
                                                                      model_cfg.n_layers, run, global_batch):
            return "memory"
    return "batch" if global_batch else "tokens"


def why_nothing_fits(model_cfg: ModelConfig, gpus: int, seq_len: int, hw: Hardware, max_global_tokens: int,
                     global_batch: int | None = None, **run) -> dict[str, list[Layout]]:
    """The layouts of `gpus` (none of which has a plan) by why_no_plan's reason."""
    reasons: dict[str, list[Layout]] = {}
    for layout in layouts(model_cfg, gpus, seq_len, hw):
        why = why_no_plan(model_cfg, layout, seq_len, max_global_tokens, global_batch, **run)
        reasons.setdefault(why, []).append(layout)
    return reasons


def pick(plans: list[dict]) -> dict | None:
    """The fastest of plans listed simplest first, a later one only where it is 1% faster."""
    best = None
    for p in plans:
        if best is None or faster(p, best):
            best = p
    return best
