"""Apply parallelism to a Llama built on the meta device, in torchtitan's fixed order:
float8 layers -> tensor parallel (train/parallel/tensor_parallel.py) -> activation checkpointing ->
torch.compile (per block) -> FSDP2 `fully_shard` over the data-parallel dims (per block, then root).

Each step wraps what the one before made: AC checkpoints TP's blocks with their collectives inside,
compile traces them (and, with async TP, fuses the collectives into the matmuls), and FSDP shards the
TP-split parameters further over the data-parallel ranks (2-D DTensors). Under pipeline parallelism
(train/parallel/pipeline.py) the model is split into stages first and each stage gets all of this as a whole
model does.
"""

import logging
from functools import partial

import torch
from torch import nn, torch_version
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from model import Llama

from ..config import ParallelSection
from .distributed import Dist
from .tensor_parallel import apply_tensor_parallel

log = logging.getLogger("train")

# Selective AC keeps the outputs of these ops (the expensive ones) and recomputes the rest
# (norms, activations, rope, elementwise) in the backward.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_mm.default,  # float8 matmuls
    torch.ops.higher_order.flex_attention,  # document masking on the GPU (model/attention.py)
}


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: Llama, mode: str, every: int = 2) -> None:
    """Wrap transformer blocks so their activations are recomputed in the backward (mode and every
    are checked at start-up by ParallelSection.check)."""
    if mode == "none":
        return
    for i, (name, block) in enumerate(model.layers.items()):
        if mode == "every_k" and i % every:
            continue
        if mode == "selective":
            policy = partial(create_selective_checkpoint_contexts, _selective_policy)
            wrapped = checkpoint_wrapper(block, context_fn=policy, preserve_rng_state=False)
        else:
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        model.layers[name] = wrapped


def apply_float8(model: Llama, recipe: str, device: torch.device) -> None:
    """Swap the blocks' nn.Linear layers for torchao's Float8Linear: float8 matmuls with dynamic scales
    (per tensor, or per row: slower, more accurate). Parameters, state-dict keys and so checkpoints
    do not change. The output head is no Linear here (the fused cross-entropy reads its weight), so it
    stays in bf16."""
    if recipe == "none":
        return
    if recipe == "rowwise" and device.type == "cpu" and not cpu_has_rowwise_float8():
        raise ValueError(f"parallel.float8=rowwise on the CPU needs torch 2.13 or newer (this is {torch.__version__}); "
                         "use parallel.float8=tensorwise")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        from torchao.float8.float8_linear import Float8Linear
    except ImportError:
        raise ValueError(f"parallel.float8={recipe} needs torchao: pip install 'torchao>=0.18'") from None
    convert_to_float8_training(model.layers, config=Float8LinearConfig.from_recipe_name(recipe),
                               # float8 matmuls need both dimensions divisible by 16
                               module_filter_fn=lambda m, _: m.in_features % 16 == 0 and m.out_features % 16 == 0)
    linears = [m for m in model.layers.modules() if isinstance(m, nn.Linear)]
    log.info("float8 matmuls (%s scaling) in %d of %d block linears", recipe,
             sum(isinstance(m, Float8Linear) for m in linears), len(linears))


def cpu_has_rowwise_float8() -> bool:
    """Whether this torch's CPU float8 matmul takes per-row scales (2.11's takes one scale per tensor)."""
    return torch_version.TorchVersion(torch.__version__) >= "2.13"


def param_dtype(parallel_cfg: ParallelSection, device: torch.device) -> torch.dtype:
    if parallel_cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if parallel_cfg.dtype == "bf16" else torch.float32


def single_device_autocast(parallel_cfg: ParallelSection, env: Dist) -> torch.dtype | None:
    """On one device, bf16 training runs under autocast instead of FSDP: FSDP would only add copies
    (gather into and out of its flat buffers, every step) with nothing to shard. Returns the
    autocast dtype, or None when FSDP applies."""
    dtype = param_dtype(parallel_cfg, env.device)
    fsdp = parallel_cfg.fsdp_single_device or parallel_cfg.cpu_offload  # offloading is FSDP's
    if env.world_size == 1 and dtype != torch.float32 and not fsdp:
        return dtype
    return None


def offload_policy(parallel_cfg: ParallelSection, device: torch.device) -> OffloadPolicy:
    """parallel.cpu_offload: FSDP keeps each rank's fp32 shards of the parameters and gradients (and so the
    optimizer keeps its state) in host memory, copies the shards to the device to gather them for each block's
    forward and backward, and the gradients' shards back after the reduce-scatter. On CUDA that memory is pinned,
    so the copies run asynchronously at full PCIe speed; the CPU has no device to pin for (torch refuses it)."""
    if not parallel_cfg.cpu_offload:
        return OffloadPolicy()
    return CPUOffloadPolicy(pin_memory=device.type == "cuda")


def parameter_device(parallel_cfg: ParallelSection, device: torch.device) -> torch.device:
    """Where the rank's parameter shards live: the host under parallel.cpu_offload, else the compute device."""
    return torch.device("cpu") if parallel_cfg.cpu_offload else device


def parallelize(model: Llama, parallel_cfg: ParallelSection, env: Dist) -> Llama:
    """Float8, TP, AC, compile and FSDP2 in place; parameters stay fp32 (master weights), compute in bf16."""
    apply_float8(model, parallel_cfg.float8, env.device)
    if env.tp_mesh is not None:
        apply_tensor_parallel(model, env.tp_mesh, float8=parallel_cfg.float8 != "none", async_tp=parallel_cfg.async_tp)
    apply_activation_checkpointing(model, parallel_cfg.activation_checkpointing, parallel_cfg.ac_every)
    if parallel_cfg.compile:
        for block in model.layers.values():
            block.compile()
    if single_device_autocast(parallel_cfg, env):
        return model
    # Inputs are not cast: blocks take the rope tables, which must stay fp32 (in bf16, cos and sin keep
    # 8 significant bits); the hidden states come out of the bf16 embedding as bf16 anyway.
    mp = MixedPrecisionPolicy(param_dtype=param_dtype(parallel_cfg, env.device), reduce_dtype=torch.float32,
                              cast_forward_inputs=False)
    # HSDP when the mesh has a replicate dim: shard inside a node, replicate across nodes.
    shard = partial(fully_shard, mesh=env.dp_mesh, mp_policy=mp,
                    offload_policy=offload_policy(parallel_cfg, env.device))
    blocks = list(model.layers.values())
    # Resharding after the forward frees memory only when there are other shards to gather from, or when the
    # shard lives on the host (cpu_offload: it frees the device's copy); under a pipeline it would gather the
    # weights again for every micro-batch (torchtitan keeps them too).
    elsewhere = env.mesh["dp_shard"].size() * env.cp > 1 or parallel_cfg.cpu_offload
    reshard = parallel_cfg.reshard_after_forward and elsewhere and env.pp == 1
    for i, block in enumerate(blocks):
        # The last block's params would be gathered again at once for the backward: keep them.
        shard(block, reshard_after_forward=reshard and i < len(blocks) - 1)
    shard(model, reshard_after_forward=False)
    return model
