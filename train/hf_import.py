"""Reading a Hugging Face Llama folder into our parameter names, and the two ways weights come in
from outside a run: `init_from` (weights only, into a plain or FSDP2-sharded model, from an HF
folder or a DCP checkpoint) and `load_any_weights` (a full state dict, in one process).

A folder is checked against the model before any tensor is read: shape fields, and the fields the
weights were trained under (rope_theta, rope_scaling, norm_eps), which would load but compute
another function.
"""

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from model import ModelConfig
from model.hf import from_hf_config, from_hf_key, to_hf_key

from .checkpoint_io import STATE_FILE, is_complete, load_weights_only
from .offline_checkpoint import (INDEX_FILE, SINGLE_FILE, checkpoint_model_config, expected_shapes,
                                 find_checkpoint, is_hf_folder, load_checkpoint_weights)

# Fields that fix parameter shapes: weights cannot be loaded across a difference in any of them.
SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "kv_heads", "vocab_size", "hidden_dim", "tie_embeddings")
# Fields the weights were trained under: across a difference they load, but the model is another one.
TRAINED_UNDER_FIELDS = ("rope_theta", "rope_scaling", "norm_eps")
# ModelConfig field -> the key a run sets it with (train/config.py's model section), where they differ.
_RUN_KEY = {"kv_heads": "n_kv_heads", "hidden_dim": "ffn_hidden_dim"}
# What a run cannot set directly: it comes with the tokenizer or the preset.
_NO_RUN_KEY = {"vocab_size": "use the tokenizer it was trained with (vocab_size={})",
               "rope_scaling": "pick a model.preset with rope_scaling={}",
               "norm_eps": "pick a model.preset with norm_eps={}"}


def check_same_model(cfg: ModelConfig, want: ModelConfig, source: Path) -> None:
    """ValueError naming the first shape or trained-under field in which `cfg` (read from `source`)
    differs from `want`, with both values and how to match them."""
    for name in SHAPE_FIELDS + TRAINED_UNDER_FIELDS:
        have, need = getattr(cfg, name), getattr(want, name)
        if have != need:
            key = _RUN_KEY.get(name, name)
            fix = _NO_RUN_KEY[key].format(have) if key in _NO_RUN_KEY else f"set model.{key}={have}"
            other = "of this shape" if name in SHAPE_FIELDS else f"trained with this model's {key}"
            raise ValueError(f"{source} has model.{key}={have} but this model has {need}; {fix} "
                             f"or init from a checkpoint {other}")


def read_hf_config(hf_dir: Path) -> ModelConfig:
    try:
        hf = json.loads((hf_dir / "config.json").read_text())
        if hf.get("model_type", "llama") != "llama":
            raise ValueError(f"{hf_dir}/config.json is a {hf['model_type']!r} model; only Llama folders can be loaded")
        return from_hf_config(hf)
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{hf_dir}/config.json is not a Llama config ({type(e).__name__}: {e}); "
                         f"re-export it") from None


def _hf_files(hf_dir: Path) -> list[Path]:
    if (hf_dir / INDEX_FILE).is_file():
        weight_map = json.loads((hf_dir / INDEX_FILE).read_text())["weight_map"]
        files = [hf_dir / f for f in dict.fromkeys(weight_map.values())]
    else:
        files = [hf_dir / SINGLE_FILE]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing safetensors file of the Hugging Face folder; "
                                    f"re-export or re-download it")
    return files


def _hf_layout(hf_dir: Path, cfg: ModelConfig) -> dict[Path, dict[str, str]]:
    """File -> {our name: HF key}, checked complete and shaped as `cfg` from the headers alone
    (no tensor read), so every rank can refuse a bad folder before any rank loads."""
    shapes, layout, seen = expected_shapes(cfg), {}, set()
    for f in _hf_files(hf_dir):
        layout[f] = {}
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                # Rotary caches are derived; a tied model may still carry a copy of the head.
                if "rotary_emb" in key or (cfg.tie_embeddings and key == "lm_head.weight"):
                    continue
                try:
                    name = from_hf_key(key)
                except KeyError:
                    raise ValueError(f"{f}: unexpected tensor {key!r}; not a Llama checkpoint this model "
                                     f"can load") from None
                shape = tuple(handle.get_slice(key).get_shape())
                if name not in shapes or shape != tuple(shapes[name]):
                    want = tuple(shapes[name]) if name in shapes else "no such tensor"
                    raise ValueError(f"{f}: {key} has shape {shape} but config.json implies {want}; "
                                     f"the folder is inconsistent (re-export it)")
                layout[f][name] = key
                seen.add(name)
    missing = [n for n in shapes if n not in seen]
    if missing:
        raise ValueError(f"{hf_dir} has no tensor {to_hf_key(missing[0])}; the folder is incomplete (re-export it)")
    return layout


def _read_hf_file(f: Path, names: dict[str, str]) -> dict[str, torch.Tensor]:
    with safe_open(str(f), framework="pt") as handle:
        return {name: handle.get_tensor(key) for name, key in names.items()}


def load_hf_weights(hf_dir) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, full state dict in our names) of a transformers Llama folder."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir}/config.json not found; pass a Hugging Face model folder")
    cfg = read_hf_config(hf_dir)
    state = {}
    for f, names in _hf_layout(hf_dir, cfg).items():
        state.update(_read_hf_file(f, names))
    return cfg, state


def load_any_weights(path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, full state dict) of a run dir, a DCP checkpoint or an HF folder (single process)."""
    path = find_checkpoint(path)
    return load_hf_weights(path) if is_hf_folder(path) else load_checkpoint_weights(path)


def init_from(path, model) -> None:
    """Weights only (continued pretraining) from a DCP checkpoint or an HF folder into a plain or
    FSDP2-sharded model; every rank of the model's group must call it."""
    path = find_checkpoint(path)
    want = model.cfg
    if is_complete(path):
        check_same_model(checkpoint_model_config(path), want, path / STATE_FILE)
        load_weights_only(path, model)
        return
    check_same_model(read_hf_config(path), want, path / "config.json")
    layout = _hf_layout(path, want)
    sharded = dist.is_initialized() and any(isinstance(p, DTensor) for p in model.parameters())
    # Sharded: rank 0 reads one file at a time and broadcasts it tensor by tensor; each rank keeps
    # its shard. Memory peaks at one safetensors file on rank 0 and one tensor elsewhere.
    options = StateDictOptions(full_state_dict=sharded, broadcast_from_rank0=sharded, strict=False)
    reads = not sharded or dist.get_rank() == 0
    for f, names in layout.items():
        part = _read_hf_file(f, names) if reads else {}
        set_model_state_dict(model, part, options=options)
        del part
