"""The Llama model against Hugging Face transformers (an implementation nobody here wrote)."""

import math

import pytest
import torch

from model import ModelConfig, RopeScaling, build_model, flops_per_token, num_params, preset
from model.hf import from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict

transformers = pytest.importorskip("transformers")

SMALL = dict(dim=64, n_layers=2, n_heads=4, vocab_size=300, multiple_of=32, max_seq_len=64, rope_theta=500000.0)


def hf_model(cfg: ModelConfig, ours) -> "transformers.LlamaForCausalLM":
    hf_cfg = transformers.LlamaConfig(**to_hf_config(cfg))
    hf_cfg._attn_implementation = "eager"  # the plain reference path, not SDPA
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"} and (cfg.tie_embeddings or not missing)
    return hf


@pytest.mark.parametrize(
    "name, overrides, batch, seq",
    [
        ("gqa_untied", dict(n_kv_heads=2), 2, 17),
        ("mha_tied", dict(n_kv_heads=None, tie_embeddings=True), 3, 16),
        ("gqa_rope_scaling",
         dict(n_kv_heads=2, rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=16)), 2, 63),
        ("mha_untied_rope_scaling_tied",
         dict(rope_scaling=RopeScaling(factor=32.0, original_max_position_embeddings=8), tie_embeddings=True), 1, 33),
        ("gqa_ffn_multiplier", dict(n_kv_heads=1, ffn_dim_multiplier=1.3, norm_eps=1e-6, rope_theta=10000.0), 2, 9),
    ],
)
def test_logits_match_transformers(name, overrides, batch, seq):
    cfg = ModelConfig(**{**SMALL, **overrides})
    ours = build_model(cfg, seed=0).eval()
    # Random norm weights too, so a mis-mapped norm cannot hide behind all-ones.
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf = hf_model(cfg, ours)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ours(tokens)
        b = hf(tokens).logits
    assert a.shape == b.shape == (batch, seq, cfg.vocab_size)
    assert (a - b).abs().max().item() < 1e-4


def test_position_ids_restart_rope_per_document():
    cfg = ModelConfig(**SMALL, n_kv_heads=2)
    model = build_model(cfg, seed=0).eval()
    doc = torch.randint(0, cfg.vocab_size, (1, 10))
    with torch.no_grad():
        alone = model(doc)
        # Positions restarting at 0 give the same rope angles as the document alone would get.
        # (Attention is still causal over the packed row, so compare only the first document.)
        packed = torch.cat([doc, doc], dim=1)
        positions = torch.cat([torch.arange(10), torch.arange(10)])[None]
        out = model(packed, position_ids=positions)
    assert torch.allclose(out[:, :10], alone, atol=1e-5)


def test_hf_config_round_trip():
    for name in ("1b", "8b", "7b"):
        cfg = preset(name)
        back = from_hf_config(to_hf_config(cfg))
        assert back.hidden_dim == cfg.hidden_dim
        assert num_params(back) == num_params(cfg)
        assert back.rope_scaling == cfg.rope_scaling and back.tie_embeddings == cfg.tie_embeddings


def test_hf_state_dict_round_trip():
    cfg = ModelConfig(**SMALL, tie_embeddings=True)
    sd = build_model(cfg, seed=0).state_dict()
    back = from_hf_state_dict(to_hf_state_dict(sd, cfg), cfg)
    assert sorted(back) == sorted(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_fresh_model_loss_near_uniform():
    cfg = preset("debug", vocab_size=8192)
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (4, 129))
    with torch.no_grad():
        logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1


@pytest.mark.parametrize("name, published", [("8b", 8.03e9), ("70b", 70.6e9), ("405b", 405.9e9), ("7b", 6.74e9),
                                             ("1b", 1.24e9), ("3b", 3.21e9)])
def test_param_counts_match_meta(name, published):
    assert abs(num_params(preset(name)) / published - 1) < 0.01


def test_param_count_formula_matches_modules():
    for overrides in (dict(n_kv_heads=2), dict(tie_embeddings=True)):
        cfg = ModelConfig(**{**SMALL, **overrides})
        model = build_model(cfg)
        assert num_params(cfg) == sum(p.numel() for p in model.parameters())
        emb = cfg.vocab_size * cfg.dim
        assert num_params(cfg, exclude_embedding=True) == num_params(cfg) - emb + (emb if cfg.tie_embeddings else 0)


def test_405b_builds_on_meta_without_memory():
    cfg = preset("405b")
    with torch.device("meta"):
        from model import Llama

        model = Llama(cfg)
    assert sum(p.numel() for p in model.parameters()) == num_params(cfg)
    assert all(p.is_meta for p in model.parameters())


def test_flops_per_token_formula():
    cfg = preset("8b")
    # Written out independently: 6 * non-embedding params + attention's 12 * L * H * Hd * T.
    n = num_params(cfg) - cfg.vocab_size * cfg.dim
    assert flops_per_token(cfg, 8192) == 6 * n + 12 * 32 * 32 * 128 * 8192


def test_config_rejects_bad_heads():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("13b")


@pytest.mark.parametrize("mode", ["fp32", "bf16", "autocast"])
def test_fused_linear_cross_entropy_matches_plain(mode):
    from model.loss import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    hidden = torch.randn(37, 16, generator=g).to(dtype).requires_grad_()
    weight = (0.3 * torch.randn(101, 16, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, 101, (37,), generator=g)
    labels[5] = -100  # ignored
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        fused = linear_cross_entropy(hidden, weight, labels, chunk_size=8)  # several chunks, one ragged
        plain = torch.nn.functional.cross_entropy((h2 @ w2.t()).float(), labels, reduction="sum")
    (2 * fused).backward()
    (2 * plain).backward()
    assert hidden.grad.dtype == weight.grad.dtype == dtype  # fp32 master weights get fp32 gradients
    tol = 1e-5 if mode == "fp32" else 2e-2
    assert torch.allclose(fused, plain, rtol=tol, atol=tol)
    assert torch.allclose(hidden.grad.float(), h2.grad.float(), rtol=tol, atol=tol)
    assert torch.allclose(weight.grad.float(), w2.grad.float(), rtol=tol, atol=tol)


def test_fused_linear_cross_entropy_without_grad_does_the_forward_matmul_only():
    """Validation runs under no_grad: the loss must cost one head matmul (2*N*V*D FLOPs), not also
    the two gradient matmuls the forward does when a backward follows; with grad, nothing changes."""
    from torch.utils.flop_counter import FlopCounterMode

    from model.loss import linear_cross_entropy

    n, v, d = 37, 101, 16
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).requires_grad_()
    weight = (0.3 * torch.randn(v, d, generator=g)).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[5, 20]] = -100  # ignored
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    plain = torch.nn.functional.cross_entropy(h2 @ w2.t(), labels, reduction="sum")
    plain.backward()
    for no_grad in (torch.no_grad, torch.inference_mode):
        with no_grad(), FlopCounterMode(display=False) as flops:
            loss = linear_cross_entropy(hidden, weight, labels, chunk_size=8)  # several chunks, one ragged
        assert flops.get_total_flops() == 2 * n * v * d
        assert not loss.requires_grad and torch.allclose(loss, plain, rtol=1e-5)
    with FlopCounterMode(display=False) as flops:
        loss = linear_cross_entropy(hidden, weight, labels, chunk_size=8)
        loss.backward()
    assert flops.get_total_flops() == 3 * 2 * n * v * d  # both gradients in the forward; the backward scales
    assert torch.allclose(loss, plain, rtol=1e-5)
    assert torch.allclose(hidden.grad, h2.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(weight.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_model_loss_equals_cross_entropy_of_logits():
    cfg = ModelConfig(**SMALL, n_kv_heads=2, tie_embeddings=True)
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        logits = model(tokens[:, :-1])
        fused = model(tokens[:, :-1], labels=tokens[:, 1:])
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
    assert torch.allclose(fused, plain, rtol=1e-5)


def test_compiled_chunk_kernel_equals_eager():
    """The chunk kernel the GPU runs (torch.compile'd) gives eager's loss and gradient, compiled here on the CPU."""
    from model.loss import IGNORE_INDEX, _chunk_loss_and_grad, compiled_chunk_kernel

    g = torch.Generator().manual_seed(0)
    logits, labels = 3 * torch.randn(40, 101, generator=g), torch.randint(0, 101, (40,), generator=g)
    labels[[3, 17]] = IGNORE_INDEX
    for needs_grad in (True, False):
        eager_loss, eager_grad = _chunk_loss_and_grad(logits, labels, needs_grad)
        loss, grad = compiled_chunk_kernel()(logits, labels, needs_grad)
        assert torch.allclose(loss, eager_loss, rtol=1e-5)
        assert (grad is None) == (eager_grad is None)
        assert grad is None or torch.allclose(grad, eager_grad, atol=1e-6)
    assert eager_grad is None and eager_loss > 0
