"""A memory and throughput planner: per-GPU memory by kind and expected tokens/s for a preset on N
GPUs, from the config alone. Assumptions are printed with every plan.

Throughput = compute time per step (the step's FLOPs, including recomputation, at a calibrated
fraction of the GPU's peak) plus the FSDP communication that compute does not hide.
"""

from dataclasses import dataclass

from model import ModelConfig, flops_per_token, num_params

from .memory import GiB, estimate_memory, total_gib


@dataclass
class Hardware:
    peak_tflops: float = 989.0  # dense bf16 per GPU (H100 SXM)
    memory_gib: float = 79.2  # usable per GPU (H100 80 GB)
    # Fraction of peak the compiled model reaches on one GPU: measured with this trainer on one H100
    # (700 W, HBM3): Llama-3-8B layer shape, 1 x 8192, selective AC, compile -> 55.4% MFU.
    efficiency: float = 0.554
    no_compile_factor: float = 0.86  # eager vs compiled (torchtitan on the H100: 45.5% vs 52-54% MFU)
    power_factor: float = 1.0  # sustained clocks relative to 700 W (0.8 at a 500 W cap, assumed)
    gpus_per_node: int = 8
    intra_node_gbs: float = 350.0  # achieved NCCL all-gather / reduce-scatter bus bandwidth, NVLink
    inter_node_gbs: float = 50.0  # per GPU across nodes (400 Gb/s RDMA per GPU)
    overlap: float = 0.95  # share of FSDP communication hidden under compute


RECOMPUTE = {"none": 0.0, "selective": 0.04, "full": 1.0}  # extra forward work, as a share of one forward


def step_flops_factor(ac_mode: str, n_layers: int, ac_every: int) -> float:
    """Compute relative to forward + backward without recomputation (forward = 1/3 of the work)."""
    if ac_mode == "every_k":
        share = ((n_layers + ac_every - 1) // ac_every) / n_layers
        return 1 + share / 3
    return 1 + RECOMPUTE[ac_mode] / 3


def plan(cfg: ModelConfig, gpus: int, micro_batch: int, seq_len: int, ac_mode: str, hw: Hardware,
         compile: bool = True, ac_every: int = 2) -> dict:
    """Memory (GiB by kind) and tokens/s per GPU for one configuration."""
    mem = estimate_memory(cfg, micro_batch, seq_len, gpus, ac_mode, 2, ac_every)
    tokens = micro_batch * seq_len
    rate = hw.peak_tflops * 1e12 * hw.efficiency * hw.power_factor * (1 if compile else hw.no_compile_factor)
    compute_s = tokens * flops_per_token(cfg, seq_len) * step_flops_factor(ac_mode, cfg.n_layers, ac_every) / rate
    n = num_params(cfg)
    # FSDP per micro-batch: bf16 all-gather in the forward and again in the backward, fp32 reduce-scatter.
    bytes_moved = (2 + 2 + 4) * n * (gpus - 1) / gpus if gpus > 1 else 0.0
    bandwidth = hw.intra_node_gbs if gpus <= hw.gpus_per_node else hw.inter_node_gbs
    comm_s = bytes_moved / (bandwidth * 1e9)
    exposed = max(0.0, comm_s - compute_s) + (1 - hw.overlap) * min(comm_s, compute_s)
    return {
        "memory_gib": {k: v / GiB for k, v in mem.items()},
        "total_gib": total_gib(mem),
        "fits": total_gib(mem) <= hw.memory_gib,
        "compute_s": compute_s,
        "comm_s": comm_s,
        "tokens_per_s_per_gpu": tokens / (compute_s + exposed),
    }


def recommend(cfg: ModelConfig, gpus: int, seq_len: int, hw: Hardware, max_micro_batch: int = 16) -> dict | None:
    """The fastest (micro batch, AC mode) that fits: larger batches first, lighter AC first."""
    best = None
    for ac in ("none", "selective", "full"):
        for mb in range(1, max_micro_batch + 1):
            p = plan(cfg, gpus, mb, seq_len, ac, hw)
            if p["fits"] and (best is None or p["tokens_per_s_per_gpu"] > best["tokens_per_s_per_gpu"] * 1.01):
                best = {**p, "micro_batch": mb, "ac": ac}
    return best
