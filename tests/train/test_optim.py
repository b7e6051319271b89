"""Learning-rate schedules, which parameters get weight decay, and clipping inside the AdamW step."""

import math

import pytest
import torch

from model import ModelConfig, build_model
from train.config import OptimSection
from train.optim import build_optimizer, gradient_norm, lr_at, scale_in_next_step


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd"])
def test_schedules_warm_up_then_decay_to_min_lr(schedule):
    cfg = OptimSection(lr=1.0, min_lr=0.1, warmup_steps=10, schedule=schedule, decay_fraction=0.2)
    lrs = [lr_at(step, 100, cfg) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # never rises after warmup
    assert lr_at(100, 100, cfg) == pytest.approx(0.1)  # ends at min_lr
    if schedule == "wsd":
        assert lrs[79] == 1.0 and lrs[81] < 1.0  # stable until the last 20%, then decays
    if schedule == "cosine":
        assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))


@pytest.mark.parametrize("values, key", [({"schedule": "step"}, "optim.schedule"), ({"lr": -1}, "optim.lr"),
                                         ({"min_lr": 1.0, "lr": 0.1}, "optim.min_lr"), ({"beta2": 1.0}, "optim.beta2")])
def test_bad_optim_values_are_refused_naming_the_key(values, key):
    with pytest.raises(ValueError, match=key):
        OptimSection(**values).check()


def test_weight_decay_only_on_matrices():
    model = build_model(ModelConfig(dim=32, n_layers=2, n_heads=2, vocab_size=64))
    opt = build_optimizer(model, OptimSection(weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert "output.weight" in decayed and "layers.0.attention.wq.weight" in decayed
    assert not any("norm" in n or "tok_embeddings" in n for n in decayed)
    assert len(decayed) + sum(len(g["params"]) for g in opt.param_groups if g["weight_decay"] == 0) == len(names)


@pytest.mark.parametrize("max_norm", [0.05, 0.0, 1e6])  # clipping active, disabled, and never reached
def test_mean_and_clipping_in_the_fused_step_match_clip_grad_norm(max_norm):
    """Gradients of a loss sum, divided by the token count and clipped inside the fused step, update
    the weights as the token-mean loss's gradients clipped by clip_grad_norm_ do."""
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, vocab_size=64)
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    ours, ref = build_model(cfg, seed=0), build_model(cfg, seed=0)
    # A large eps makes the update depend on the gradient's scale (Adam is otherwise nearly scale
    # free), so a wrong clipping factor shows in the weights.
    optim_cfg = OptimSection(lr=1e-2, eps=1e-3)
    ours_opt, ref_opt = (build_optimizer(m, optim_cfg) for m in (ours, ref))
    for _ in range(3):
        ours(tokens[:, :-1], labels=tokens[:, 1:]).backward()  # the sum over the 64 tokens
        (ref(tokens[:, :-1], labels=tokens[:, 1:]) / tokens[:, 1:].numel()).backward()
        norm = scale_in_next_step(ours_opt, gradient_norm(list(ours.parameters())), tokens[:, 1:].numel(), max_norm)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm or float("inf"), foreach=True)
        assert torch.allclose(norm, ref_norm, rtol=1e-5)
        ours_opt.step(), ref_opt.step()
        ours_opt.zero_grad(), ref_opt.zero_grad()
    if max_norm == 0.05:
        assert norm > 10 * max_norm  # the clipping did act
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
