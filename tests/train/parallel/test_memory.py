"""The memory estimate (train/planner/memory.py) against what a compiled block really keeps, and the
trainer's start-up memory gate."""

import pytest
import torch

from model import Llama, ModelConfig, preset
from train.config import BatchShape, TrainConfig
from train.parallel.distributed import Dist
from train.parallel.memory_gate import check_memory
from train.parallel.parallelize import apply_activation_checkpointing
from train.planner.memory import (
    allocator_reserve_bytes,
    block_saved_bytes,
    eager_bytes,
    estimate_memory,
    reserved_gib,
)


@pytest.mark.parametrize("ac_mode", ["none", "selective", "full"])
def test_block_activations_are_what_compile_keeps(ac_mode):
    """Count, tensor by tensor, what autograd keeps for the backward of one compiled bf16 block of the
    Llama-3.2-1B shape; the estimate must match it to 2%."""
    # Equal to no model dimension: a kept tensor with T in its shape is an activation. Each kept tensor is
    # linear in T, so 200 keeps the same bytes per token as 1000 (checked) for a fifth of the forward's slow
    # bf16 matmuls on a CPU; a (T, T) attention matrix kept by mistake would still add 17% or more.
    T = 200
    cfg = preset("tt_1b", n_layers=1, vocab_size=256, max_seq_len=T)
    torch.manual_seed(0)
    model = Llama(cfg)
    apply_activation_checkpointing(model, ac_mode)
    block = model.layers["0"]
    block.compile()
    cos, sin = model.rope_cos[:, None, :], model.rope_sin[:, None, :]  # (T, 1, Hd): the model's, not counted
    constants = {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
    kept = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if T in t.shape and storage.data_ptr() not in constants:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(1, T, cfg.dim, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        block(x, cos, sin)
    per_token = sum(kept.values()) / T
    assert per_token == pytest.approx(block_saved_bytes(cfg, ac_mode, 2), rel=0.02)


def test_the_start_up_memory_gate_refuses_unless_told_not_to(monkeypatch):
    """70B in fp32 on this CPU is refused before anything is allocated; memory_check=false lets it by."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    one_cpu = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    cfg = TrainConfig(micro_batch_size=1)
    shape = BatchShape(cfg.micro_batch_size, cfg.global_batch_size, cfg.data.seq_len)
    check_memory(preset("debug"), cfg.parallel, shape, one_cpu, False, cfg.memory_check)  # fits
    with pytest.raises(MemoryError, match="memory_check=false"):
        check_memory(preset("70b"), cfg.parallel, shape, one_cpu, False, cfg.memory_check)
    cfg.memory_check = False
    check_memory(preset("70b"), cfg.parallel, shape, one_cpu, False, cfg.memory_check)


def test_context_parallel_memory_counts_the_mask_and_the_gathered_keys_and_values():
    """Llama 3.1 8B (8.03B parameters, 32 layers, 8 KV heads of 128) at 131,072 tokens over cp=8 ranks: a rank holds
    16,384 tokens' activations, its mask (on CUDA a BlockMask of 128 x 1,024 tiles: int32 counts and indices, for
    the partial and the full tiles, by query and by key; on the CPU the (1, 1, 16384, 131072) bf16 additive mask),
    and the gathered bf16 K and V (1, 8, 131072,
    128) of every block that keeps them (all without AC; under AC only the block being recomputed), less the
    T/cp rows the block count holds already; FSDP shards the fp32 state over dp_shard x cp = 8 ranks."""
    cfg, T, cp, bf16 = preset("8b"), 131072, 8, 2
    gathered = 2 * T * 8 * 128 * bf16  # K and V of one block, all T positions
    for ac, holding in (("none", 32), ("selective", 1), ("full", 1)):
        est = estimate_memory(cfg, 1, T, cp, ac, bf16, cp=cp)
        assert est["cp_mask"] == pytest.approx(4 * 128 * (1024 + 1) * 4)
        assert estimate_memory(cfg, 1, T, cp, ac, bf16, cp=cp, cp_mask="sdpa")["cp_mask"] == (T // cp) * T * bf16
        assert est["cp_kv"] == pytest.approx(holding * (gathered - gathered / cp))
        assert est["params"] == pytest.approx(4 * 8_030_261_248 / 8) and "document_mask" not in est
        assert est["optimizer"] == pytest.approx(8 * 8_030_261_248 / 8)
        # A rank's activations are those of its T/cp tokens, as if it held whole sequences that long.
        assert est["activations"] == estimate_memory(cfg, 1, T // cp, cp, ac, bf16)["activations"]
    # The CP mask replaces the document mask: (T/cp) x T, not T x T.
    masked = estimate_memory(cfg, 1, T, cp, "full", bf16, document_mask="sdpa", cp=cp, cp_mask="sdpa")
    assert "document_mask" not in masked and masked["cp_mask"] == 4 * 2**30


def test_the_start_up_memory_gate_counts_context_parallelism(monkeypatch, caplog):
    """8B at 131,072 tokens on 8 ranks as cp 8, fp32 on the CPU: the gate counts a rank's mask, 16,384 x 131,072 x
    4 bytes = 8 GiB, and shards the fp32 state over the 8 ranks (4 bytes x 8.03B / 8 = 3.74 GiB of parameters)."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    eight = Dist(rank=0, world_size=8, local_rank=0, device=torch.device("cpu"), mesh=None)
    cfg = TrainConfig(micro_batch_size=1, memory_check=False)
    cfg.parallel.cp, cfg.parallel.dtype = 8, "fp32"
    shape = BatchShape(1, 8, 131072)
    with caplog.at_level("INFO", logger="train"):
        check_memory(preset("8b"), cfg.parallel, shape, eight, False, cfg.memory_check)
    estimate = next(r.getMessage() for r in caplog.records if "memory estimate" in r.getMessage())
    assert "cp_mask 8.00" in estimate and f"params {4 * 8_030_261_248 / 8 / 2**30:.2f}" in estimate


def test_an_eager_block_keeps_what_compile_keeps_and_the_eager_extra():
    """parallel.compile=false (the CPU's default): an eager fp32 block of a small shape keeps, tensor by tensor, the
    compiled set and eager_bytes (each norm's normalized input, SwiGLU's silu output), to 2%."""
    T = 200
    cfg = ModelConfig(dim=256, n_layers=1, n_heads=8, n_kv_heads=4, vocab_size=256, max_seq_len=T)
    model = Llama(cfg)
    cos, sin = model.rope_cos[:, None, :], model.rope_sin[:, None, :]
    constants = {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
    kept = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if T in t.shape and t.untyped_storage().data_ptr() not in constants:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.layers["0"](torch.randn(1, T, cfg.dim, requires_grad=True), cos, sin)
    expected = block_saved_bytes(cfg, "none", 4) + eager_bytes(cfg, 4)
    assert sum(kept.values()) / T == pytest.approx(expected, rel=0.02)


def test_the_allocators_reserve_is_the_fsdp_streams_buffers():
    """CUDA's caching allocator keeps what FSDP2's all-gather and reduce-scatter streams freed for those streams:
    two blocks' bf16 all-gather outputs and two blocks' fp32 gradients in and their shards out, on one of tp ranks
    (405B's block counted from its shape here: q, o, k, v, SwiGLU's three matrices and two norms); none without
    FSDP sharding."""
    cfg = preset("405b")
    d, kv, f = cfg.dim, cfg.kv_heads * cfg.head_dim, cfg.hidden_dim
    block = (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) / 8  # attention, SwiGLU, two norms; over tp 8
    reserve = allocator_reserve_bytes(cfg, dp_shard=8, tp=8)
    assert reserve["all_gather_stream"] == pytest.approx(2 * block * 2)
    assert reserve["reduce_scatter_stream"] == pytest.approx(2 * block * 4 * (1 + 1 / 8))
    assert allocator_reserve_bytes(cfg, dp_shard=1, tp=8) == {}
    est = {"all": 60 * 2**30}
    assert reserved_gib(est, cfg, 8, 8) == pytest.approx(60 + sum(reserve.values()) / 2**30)
