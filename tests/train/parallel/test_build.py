"""The model is built one way on every device (meta device, split, parallelize, allocate this rank's shards,
initialise them) and starts from bit-identical weights whatever the layout: each layout's gathered weights
equal one process's whole model, tensor by tensor, and no rank makes a tensor larger than its own shards or
one initialisation tile."""

import json
import subprocess

import pytest
import torch
from helpers import SUPPORT, TORCHRUN, env

import model.init
from model import build_model
from model.init import Shard, normal_shard
from train.config import TrainConfig
from train.parallel.build import resolve_model_config

# 4 blocks (pp 2 x 2 virtual stages), an untied head (pipeline parallelism needs one), fp32 everywhere.
MODEL = ["model.dim=48", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden_dim=96",
         "model.max_seq_len=32", "model.tie_embeddings=false", "data.seq_len=32", "seed=3", "parallel.dtype=fp32",
         "global_batch_size=8", "micro_batch_size=1"]
LAYOUTS = {
    1: {"one rank (FSDP over 1)": []},
    2: {"dp_shard=2, full AC": ["parallel.activation_checkpointing=full"],
        "tp=2, float8": ["parallel.tp=2", "parallel.float8=tensorwise"],
        "pp=2 1F1B": ["parallel.pp=2", "parallel.pp_schedule=1F1B"],
        "pp=2 Interleaved1F1B x 2 stages": ["parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B"],
        "pp=2 ZBVZeroBubble": ["parallel.pp=2", "parallel.pp_schedule=ZBVZeroBubble", "val_batches=0"]},
    4: {"dp_replicate=2 x dp_shard=2": ["parallel.dp_replicate=2"],
        "tp=2 x dp_shard=2": ["parallel.tp=2"],
        "pp=2 x tp=2": ["parallel.pp=2", "parallel.tp=2"]},
}


@pytest.fixture(scope="module")
def reference():
    """One process's whole model (model.build_model), with the worker's small tiles."""
    tiles = model.init.TILE_COLS, model.init.TILE_ELEMENTS
    model.init.TILE_COLS, model.init.TILE_ELEMENTS = 24, 24 * 5
    try:
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.from_dotlist(MODEL)))
        whole = build_model(resolve_model_config(cfg.model, 256, cfg.data.seq_len, cfg.parallel.tp), seed=3)
    finally:
        model.init.TILE_COLS, model.init.TILE_ELEMENTS = tiles
    params = {name: p.detach() for name, p in whole.named_parameters()}
    return {"params": params, "rope": (whole.rope_cos, whole.rope_sin)}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every layout built by init_layout_worker.py: {layout: [each rank's file]}; one torchrun per world size."""
    root, found = tmp_path_factory.mktemp("layouts"), {}
    for nproc, layouts in LAYOUTS.items():
        out = root / str(nproc)
        cmd = [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", str(SUPPORT / "init_layout_worker.py"),
               str(out), json.dumps([MODEL + overrides for overrides in layouts.values()])]
        proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        for i, name in enumerate(layouts):
            found[name] = [torch.load(out / str(i) / f"rank{r}.pt") for r in range(nproc)]
    return found


@pytest.mark.parametrize("layout", [name for layouts in LAYOUTS.values() for name in layouts])
def test_every_layout_starts_from_the_same_weights(built, reference, layout):
    held = {}
    for rank in built[layout]:
        for name, (whole, _) in rank["weights"].items():
            assert torch.equal(held.setdefault(name, whole), whole), f"{name} differs between the ranks holding it"
    assert sorted(held) == sorted(reference["params"])
    largest = max((held[n] - p).abs().max().item() for n, p in reference["params"].items())
    assert largest == 0.0, f"{layout}: weights differ from one process's by up to {largest}"
    cos, sin = reference["rope"]
    for rank in built[layout]:  # every stage's rope tables made where its shards were allocated
        assert all(torch.equal(c, cos) and torch.equal(s, sin) for c, s in rank["ropes"])
    # Every block drawn apart: no two same-shaped weights alike (pipeline ranks once drew the same blocks).
    blocks = [held[f"layers.{i}.attention.wq.weight"] for i in range(4)]
    assert all(not torch.equal(a, b) for i, a in enumerate(blocks) for b in blocks[i + 1:])


@pytest.mark.parametrize("layout", ["dp_shard=2, full AC", "tp=2 x dp_shard=2", "dp_replicate=2 x dp_shard=2",
                                    "pp=2 x tp=2"])
def test_no_rank_makes_a_whole_parameter_it_does_not_hold(built, reference, layout):
    """The largest tensor made during the build is the rank's largest shard or a tile (or the rope table),
    while the model's largest parameter (the embedding or the head, 256 x 48) is larger than both."""
    whole_largest = max(p.numel() for p in reference["params"].values())
    for rank in built[layout]:
        shard_largest = max(numel for _, numel in rank["weights"].values())
        bound = max(shard_largest, 24 * 5, 32 * 12)  # shards, one tile, the rope table (positions x head dim)
        assert rank["largest_allocation"] <= bound < whole_largest


def test_a_shard_gets_the_whole_parameters_values_at_its_positions(monkeypatch):
    """normal_shard on any box of rows and columns equals that box of the whole parameter, tiles crossed or not."""
    monkeypatch.setattr(model.init, "TILE_COLS", 8)
    monkeypatch.setattr(model.init, "TILE_ELEMENTS", 40)  # tiles of 5 x 8
    whole = torch.empty(37, 29)
    normal_shard(Shard(whole, (37, 29)), 0.02, 5, "w")
    for rows, cols in [(slice(0, 37), slice(0, 29)), (slice(3, 20), slice(0, 29)), (slice(0, 37), slice(7, 8)),
                       (slice(36, 37), slice(28, 29)), (slice(10, 30), slice(4, 25))]:
        part = torch.empty(rows.stop - rows.start, cols.stop - cols.start)
        normal_shard(Shard(part, (37, 29), (rows.start, cols.start)), 0.02, 5, "w")
        assert torch.equal(part, whole[rows, cols])
    other = torch.empty(37, 29)
    normal_shard(Shard(other, (37, 29)), 0.02, 5, "w2")
    assert not torch.equal(other, whole)
    assert abs(whole.std().item() - 0.02) < 0.003
