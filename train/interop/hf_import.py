"""Reading a Hugging Face Llama folder into our parameter names, and the two ways weights come in
from outside a run: `init_from` (weights only, into a plain or FSDP2-sharded model, from an HF
folder, Meta's original folder or a DCP checkpoint) and `load_any_weights` (a full state dict, in one process).

A source is checked against the model before any tensor is read: shape fields, the fields the
weights were trained under (rope_theta, rope_scaling, norm_eps), which would load but compute
another function, and, when the run's tokenizer is given, the tokenizer the source comes with.
"""

import json
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from model import ModelConfig
from model.hf import from_hf_config, from_hf_key, to_hf_key
from model.meta import PARAMS_FILE, MetaFolder, is_meta_folder

from ..state.checkpoint import CONTEXT_KEY
from ..state.checkpoint_io import STATE_FILE, is_complete, load_weights_only, read_train_state, saved_steps
from .hf_tokenizer import check_source_tokenizer
from .offline_checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    checkpoint_model_config,
    expected_shapes,
    find_checkpoint,
    is_hf_folder,
    load_checkpoint_weights,
)

# train_state.json's record of the context a run's init_from source was made for (absent: the model's max_seq_len).
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


def check_same_model(source_cfg: ModelConfig, model_cfg: ModelConfig, source: Path) -> None:
    """ValueError naming the first shape or trained-under field in which `source_cfg` (read from `source`)
    differs from `model_cfg`, with both values and how to match them."""
    for name in SHAPE_FIELDS + TRAINED_UNDER_FIELDS:
        have, need = getattr(source_cfg, name), getattr(model_cfg, name)
        if have != need:
            key = _RUN_KEY.get(name, name)
            fix = _NO_RUN_KEY[key].format(have) if key in _NO_RUN_KEY else f"set model.{key}={have}"
            other = "of this shape" if name in SHAPE_FIELDS else f"trained with this model's {key}"
            raise ValueError(f"{source} has model.{key}={have} but this model has {need}; {fix} "
                             f"or init from a checkpoint {other}")


def check_init_before_build(ckpt_cfg, checkpoints: Path, model_cfg: ModelConfig, tokenizer) -> None:
    """check_init_shape for a run that will load checkpoint.init_from (ckpt_cfg: the config's checkpoint section):
    one that names it and has no checkpoint of its own to resume from (none saved in `checkpoints` under
    resume=auto, or resume=none); a resumed run's shape is its checkpoint's, checked by its fingerprint."""
    resumes = ckpt_cfg.resume not in ("auto", "none") or (ckpt_cfg.resume == "auto" and saved_steps(checkpoints))
    if ckpt_cfg.init_from and not resumes:
        check_init_shape(ckpt_cfg.init_from, model_cfg, tokenizer)


def check_init_shape(source, model_cfg: ModelConfig, tokenizer=None) -> None:
    """Before the model is built (and the memory gate sizes it): the init_from `source`'s tokenizer as init_from
    checks it, then a ValueError in one line naming every shape key (SHAPE_FIELDS) in which the source differs from
    the run's `model_cfg`, with the values to set. Only configs and headers are read: a shape left to the preset
    (its model.* keys left out) is named here, not reported as a model too large for the GPUs."""
    path = find_checkpoint(source)
    source_cfg, said_by = source_config(path)
    if tokenizer is not None:
        check_source_tokenizer(path, source_cfg.vocab_size, tokenizer, model_cfg.vocab_size)
    differ = [name for name in SHAPE_FIELDS if getattr(source_cfg, name) != getattr(model_cfg, name)]
    if not differ:
        return
    keys = {name: f"model.{_RUN_KEY.get(name, name)}" for name in differ}
    found = ", ".join(f"{keys[name]}={getattr(source_cfg, name)} (the run: {getattr(model_cfg, name)})"
                      for name in differ)
    # The vocabulary comes from the tokenizer unless vocab_from_tokenizer=false.
    fix = " ".join(f"{'model.vocab_from_tokenizer=false ' * (name == 'vocab_size')}{keys[name]}="
                   f"{getattr(source_cfg, name)}" for name in differ)
    raise ValueError(f"checkpoint.init_from={source} is another shape than the run's model ({said_by}): {found}; "
                     f"set {fix}, or init from a checkpoint of the run's shape")


def source_config(path: Path) -> tuple[ModelConfig, Path]:
    """The ModelConfig an init_from source (found by find_checkpoint) was made with, and the file that says so:
    a checkpoint's train_state.json, Meta's params.json (checked against the tensors' shapes), an HF config.json."""
    if is_complete(path):
        return checkpoint_model_config(path), path / STATE_FILE
    if is_meta_folder(path):
        return MetaFolder(path).cfg, path / PARAMS_FILE
    return read_hf_config(path), path / "config.json"


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


def _hf_layout(hf_dir: Path, model_cfg: ModelConfig) -> dict[Path, dict[str, str]]:
    """File -> {our name: HF key}, checked complete and shaped as `model_cfg` from the headers alone
    (no tensor read), so every rank can refuse a bad folder before any rank loads."""
    shapes, layout, seen = expected_shapes(model_cfg), {}, set()
    for f in _hf_files(hf_dir):
        layout[f] = {}
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                # Rotary caches are derived; a tied model may still carry a copy of the head.
                if "rotary_emb" in key or (model_cfg.tie_embeddings and key == "lm_head.weight"):
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
    model_cfg = read_hf_config(hf_dir)
    state = {}
    for f, names in _hf_layout(hf_dir, model_cfg).items():
        state.update(_read_hf_file(f, names))
    return model_cfg, state


def load_any_weights(path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, full state dict) of a run dir, a DCP checkpoint, an HF or a Meta folder (single process)."""
    path = find_checkpoint(path)
    if is_meta_folder(path):
        meta = MetaFolder(path)
        return meta.cfg, {name: meta.tensor(name) for name in meta.shapes}
    return load_hf_weights(path) if is_hf_folder(path) else load_checkpoint_weights(path)


def init_from(path, model, tokenizer=None) -> int:
    """Weights only (continued pretraining) from a DCP checkpoint, an HF folder or Meta's original folder into
    a plain or FSDP2-sharded model; every rank of the model's group must call it. `tokenizer` (the one the
    shards were built with, data_pipeline.tokenizer.Tokenizer), when given, must be the source's own tokenizer
    where it has one, with one embedding row per token. Returns the source's context (positions), which the run
    carries to its export: Llama 3.1's 131072 stays 131072 though the run trains at 8192."""
    path = find_checkpoint(path)
    model_cfg = model.cfg
    source_cfg, source = source_config(path)
    if tokenizer is not None:
        check_source_tokenizer(path, source_cfg.vocab_size, tokenizer, model_cfg.vocab_size)
    check_same_model(source_cfg, model_cfg, source)
    if is_complete(path):
        load_weights_only(path, model)
    elif is_meta_folder(path):
        # One block at a time: Meta's slices are joined and q/k permuted per block, never the whole model.
        meta = MetaFolder(path)  # memory-mapped: opening it again reads no tensor
        _load_in_parts(model, [partial(_read_meta, meta, names) for names in meta.names_by_layer()])
    else:
        _load_in_parts(model, [partial(_read_hf_file, f, names) for f, names in _hf_layout(path, model_cfg).items()])
    return model_context(path, source_cfg)


def model_context(path: Path, model_cfg: ModelConfig) -> int:
    """The positions a model is made for: its config's max_seq_len, or, for a checkpoint of ours, the larger of
    that and the context its run carried from its own init_from (train_state.json's CONTEXT_KEY)."""
    carried = read_train_state(path).get(CONTEXT_KEY) if is_complete(path) else None
    return max(model_cfg.max_seq_len, carried or 0)


def _read_meta(meta: MetaFolder, names: list[str]) -> dict[str, torch.Tensor]:
    return {name: meta.tensor(name) for name in names}


def _load_in_parts(model, reads) -> None:
    """Load the pieces of a full state dict that `reads` return, one after another. Sharded: rank 0 reads each
    piece and broadcasts it tensor by tensor; each rank keeps its shard. Memory peaks at one piece (a safetensors
    file, a Meta block) on rank 0 and one tensor elsewhere."""
    sharded = dist.is_initialized() and any(isinstance(p, DTensor) for p in model.parameters())
    options = StateDictOptions(full_state_dict=sharded, broadcast_from_rank0=sharded, strict=False)
    reads_here = not sharded or dist.get_rank() == 0
    for read in reads:
        part = read() if reads_here else {}
        set_model_state_dict(model, part, options=options)
        del part
