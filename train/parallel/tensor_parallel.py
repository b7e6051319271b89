"""Tensor parallelism for Llama (Megatron-style, with sequence parallelism), through
torch.distributed.tensor.parallel: the first step of train/parallel/parallelize.py's order.

Inside a block, attention's q/k/v and the feed-forward's w1/w3 are split column-wise (each TP rank
computes H/tp heads, F/tp hidden units) and attention's o and the feed-forward's w2 row-wise (each
rank's partial sums are reduce-scattered). Between them the residual stream and the norms are
sequence-parallel: each rank holds T/tp positions, all-gathered before a split matmul. The embedding
is split by vocabulary rows; the output head too, and the loss reads it without gathering it
(train/parallel/loss_parallel.py). No collective is written by hand: DTensor's placements place them.
"""

import logging
import os

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from model import Llama, ModelConfig

from .loss_parallel import vocab_parallel_linear_cross_entropy

log = logging.getLogger("train")


class LayoutError(ValueError):
    """A model that cannot be split over parallel.tp ranks (one line, naming the key)."""


def check_tp_layout(model_cfg: ModelConfig, seq_len: int, tp: int) -> None:
    """Refuse at start-up a model or sequence that tp ranks cannot split evenly; warn when a TP group
    would span nodes (its collectives, several per block, would then cross the network)."""
    if tp == 1:
        return
    for key, value in (("n_heads", model_cfg.n_heads), ("n_kv_heads", model_cfg.kv_heads),
                       ("vocab_size", model_cfg.vocab_size), ("hidden_dim", model_cfg.hidden_dim)):
        if value % tp:
            pad = (f", or pad it: model.vocab_from_tokenizer=false model.vocab_size={-(-value // tp) * tp}"
                   if key == "vocab_size" else "")
            raise LayoutError(f"parallel.tp={tp} must divide the model's {key}={value} (each rank takes an equal "
                              f"share); pick a tp that divides it{pad}")
    if seq_len % tp:
        raise LayoutError(f"data.seq_len={seq_len} must be divisible by parallel.tp={tp} (sequence parallelism "
                          f"splits the positions evenly)")
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", tp))
    if tp > per_node:
        log.warning("parallel.tp=%d is larger than the %d processes of a node: TP's per-block collectives cross "
                    "the network and will be slow; keep tp within a node and scale with data parallelism",
                    tp, per_node)


def _block_plan(float8: bool) -> dict:
    """The plan of one transformer block; float8 swaps in torchao's styles, which all-gather in float8.
    Every output stays a DTensor (use_local_output=False): the residual stream is one, Shard(1), between
    blocks, which is also what lets compiled blocks carry the right gradients back to the embedding."""
    colwise, rowwise, prepare = ColwiseParallel, RowwiseParallel, PrepareModuleInput
    if float8:
        from torchao.float8.float8_tensor_parallel import (
            Float8ColwiseParallel,
            Float8RowwiseParallel,
            PrepareFloat8ModuleInput,
        )

        colwise, rowwise, prepare = Float8ColwiseParallel, Float8RowwiseParallel, PrepareFloat8ModuleInput
    # attention(x, cos, sin, mask): only x is distributed; cos, sin and the mask are the same everywhere.
    return {
        "attention_norm": SequenceParallel(),
        "attention": prepare(input_layouts=(Shard(1), None, None, None),
                             desired_input_layouts=(Replicate(), None, None, None)),
        "attention.wq": colwise(),
        "attention.wk": colwise(),
        "attention.wv": colwise(),
        "attention.wo": rowwise(output_layouts=Shard(1), use_local_output=False),
        "ffn_norm": SequenceParallel(),
        "feed_forward": prepare(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": colwise(),
        "feed_forward.w3": colwise(),
        "feed_forward.w2": rowwise(output_layouts=Shard(1), use_local_output=False),
    }


def apply_tensor_parallel(model: Llama, tp_mesh: DeviceMesh, float8: bool, async_tp: bool) -> None:
    """Split the model over the TP mesh in place (parameters become DTensors on it)."""
    top = {
        # Token ids are the same on every TP rank; the embedding's partial rows are reduce-scattered
        # into this rank's positions of the residual stream.
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(),  # the head's weight split by vocabulary rows; the loss reads it as it is
    }
    parallelize_module(model, tp_mesh, {name: style for name, style in top.items() if getattr(model, name) is not None})
    _pipeline_stage_edges(model, tp_mesh)
    for block in model.layers.values():
        # gloo has no float8 all-gather: on the CPU float8 linears gather in the compute dtype, then cast.
        parallelize_module(block, tp_mesh, _block_plan(float8 and tp_mesh.device_type == "cuda"))
    model.head_loss = vocab_parallel_linear_cross_entropy
    if async_tp:
        _enable_async_tp(tp_mesh)
    log.info("tensor parallel over %d ranks: sequence-parallel norms, vocabulary-parallel embedding, head and loss",
             tp_mesh.size())


def _pipeline_stage_edges(stage: Llama, tp_mesh: DeviceMesh) -> None:
    """A pipeline stage (train/parallel/pipeline.py) sends and receives plain tensors: its rank's sequence shard of the
    residual stream (B, T / tp, D). They become the Shard(1) DTensor again at the first block of a stage
    without the embedding, and local tensors after the last block of a stage without the head."""
    blocks = list(stage.layers.values())
    if stage.tok_embeddings is None:
        parallelize_module(blocks[0], tp_mesh, PrepareModuleInput(
            input_layouts=(Shard(1), None, None, None), desired_input_layouts=(Shard(1), None, None, None),
            use_local_output=False))
    if stage.norm is None:
        parallelize_module(blocks[-1], tp_mesh, PrepareModuleOutput(
            output_layouts=Shard(1), desired_output_layouts=Shard(1), use_local_output=True))


def _enable_async_tp(tp_mesh: DeviceMesh) -> None:
    """Overlap TP's all-gathers and reduce-scatters with the matmuls that use them: compiled blocks
    fuse them into symmetric-memory kernels (torch's micro-pipeline TP; CUDA only, see ParallelSection.check)."""
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    torch._inductor.config._micro_pipeline_tp = True
    enable_symm_mem_for_group(tp_mesh.get_group().group_name)

