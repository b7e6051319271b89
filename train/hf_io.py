"""Hugging Face interoperability: export a DCP checkpoint as a transformers Llama folder, read one
back, and initialise a (sharded) model from either kind of folder.

An HF folder holds `config.json`, `model.safetensors` (or `model-0000i-of-0000n.safetensors` shards
plus `model.safetensors.index.json`), `generation_config.json` and, when a SentencePiece model is
given, `tokenizer.model` + `tokenizer.json` + `tokenizer_config.json` + `special_tokens_map.json`.
"""

import json
import logging
import os
import shutil
import warnings
from dataclasses import fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from model import Llama, ModelConfig
from model.hf import from_hf_config, from_hf_key, to_hf_config, to_hf_key

from . import checkpoint as ckpt

log = logging.getLogger("train")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Fields that fix parameter shapes: weights cannot be loaded across a difference in any of them.
SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "kv_heads", "vocab_size", "hidden_dim", "tie_embeddings")
_TOKENIZER_PROBE = "ROMEO: Wherefore art thou, Romeo?\n  Two  spaces, 12345 digits, héllo ✓ 日本."


# -- locating checkpoints -------------------------------------------------------------------------
def find_checkpoint(path) -> Path:
    """A run dir -> its newest complete checkpoint; a checkpoint or HF folder -> itself."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory; pass a run dir, a checkpoint or an HF folder")
    if ckpt.is_complete(path) or is_hf_folder(path):
        return path
    if (path / "checkpoints").is_dir():
        latest = ckpt.Checkpointer(path / "checkpoints").latest()
        if latest is None:
            raise FileNotFoundError(f"{path}/checkpoints holds no complete checkpoint; train with "
                                    f"checkpoint.save_final=true or pass a step_* folder")
        return latest
    raise FileNotFoundError(f"{path}: not a complete checkpoint (needs .metadata and {ckpt.STATE_FILE}), "
                            f"a run dir (with checkpoints/) or an HF folder (config.json + *.safetensors)")


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and ((path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file())


def checkpoint_model_config(path: Path) -> ModelConfig:
    """The ModelConfig a DCP checkpoint was trained with (train_state.json's fingerprint)."""
    if not ckpt.is_complete(path):
        raise FileNotFoundError(f"{path}: not a complete checkpoint (needs .metadata and {ckpt.STATE_FILE}); "
                                f"point at a step_* folder of a finished save")
    saved = ckpt.read_train_state(path).get("fingerprint", {}).get("model")
    if not isinstance(saved, dict):
        raise ValueError(f"{path / ckpt.STATE_FILE} has no fingerprint.model; it was not written by the trainer")
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in saved.items() if k in known})


def check_same_shape(cfg: ModelConfig, want: ModelConfig, source: Path) -> None:
    """ValueError naming the first shape field in which `cfg` (from `source`) differs from `want`."""
    for name in SHAPE_FIELDS:
        have, need = getattr(cfg, name), getattr(want, name)
        if have != need:
            field = {"kv_heads": "n_kv_heads", "hidden_dim": "ffn_hidden_dim"}.get(name, name)
            raise ValueError(f"{source} has model.{field}={have} but this model has {need}; "
                             f"set model.{field}={have} or init from a checkpoint of this shape")


# -- reading a DCP checkpoint without a process group ---------------------------------------------
def _expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Our parameter names and shapes, in module order (built on meta: no memory)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in Llama(cfg).state_dict().items()}


def _checkpoint_tensors(path: Path, cfg: ModelConfig) -> dict[str, torch.dtype]:
    """Name -> stored dtype of every model weight, after checking the shapes against the config."""
    stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    dtypes = {}
    for name, shape in _expected_shapes(cfg).items():
        meta = stored.get(f"model.{name}")
        if meta is None or not hasattr(meta, "size"):
            raise ValueError(f"{path}/.metadata has no tensor model.{name}; the checkpoint does not match its "
                             f"{ckpt.STATE_FILE} (re-save it)")
        if tuple(meta.size) != tuple(shape):
            raise ValueError(f"{path}: model.{name} has shape {tuple(meta.size)} but {ckpt.STATE_FILE}'s model "
                             f"config gives {tuple(shape)}; the checkpoint is inconsistent (re-save it)")
        dtypes[name] = meta.properties.dtype
    return dtypes


def _read_checkpoint(path: Path, names: list[str], shapes, dtypes) -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors of `names` from a checkpoint of any world size, in this process only."""
    tensors = {n: torch.empty(shapes[n], dtype=dtypes[n]) for n in names}
    # DCP reassembles each tensor from however many ranks wrote it; only these keys are read.
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.load({"model": tensors}, checkpoint_id=str(path), no_dist=True)
    return tensors


def load_checkpoint_weights(path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, full model state dict in our names) of a DCP checkpoint, without a process group."""
    path = Path(path)
    cfg = checkpoint_model_config(path)
    dtypes = _checkpoint_tensors(path, cfg)
    return cfg, _read_checkpoint(path, list(dtypes), _expected_shapes(cfg), dtypes)


# -- export -----------------------------------------------------------------------------------------
def _plan_shards(shapes, dtypes, max_shard_bytes: int) -> list[list[str]]:
    """Consecutive names grouped so that each group stays under max_shard_bytes (a bigger tensor
    gets a group of its own)."""
    groups, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = shape.numel() * dtypes[name].itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def export_hf(checkpoint_dir, out_dir, tokenizer_path=None, max_shard_bytes: int = 5 * 2**30,
              dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write a DCP checkpoint (any world size) as a transformers Llama folder; returns out_dir.

    Tensors are read one output shard at a time, so memory peaks at about one shard."""
    src, out = Path(checkpoint_dir), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pick another out dir or pass overwrite=true")
    cfg = checkpoint_model_config(src)
    dtypes = _checkpoint_tensors(src, cfg)
    shapes = _expected_shapes(cfg)
    out_dtypes = {n: dtype or d for n, d in dtypes.items()}

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        bos_id = eos_id = None
        if tokenizer_path is not None:
            bos_id, eos_id = export_tokenizer(Path(tokenizer_path), tmp, cfg)
        groups = _plan_shards(shapes, out_dtypes, max_shard_bytes)
        weight_map, total = {}, 0
        for i, names in enumerate(groups):
            fname = SINGLE_FILE if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            part = _read_checkpoint(src, names, shapes, dtypes)
            hf = {to_hf_key(n): t.to(out_dtypes[n]).contiguous() for n, t in part.items()}
            save_file(hf, str(tmp / fname), metadata={"format": "pt"})
            os.chmod(tmp / fname, 0o644)  # safetensors writes 0600; the export is meant to be shared
            for key, t in hf.items():
                weight_map[key] = fname
                total += t.numel() * t.element_size()
            del part, hf
        if len(groups) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        dtype_name = str(next(iter(out_dtypes.values()))).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps({**to_hf_config(cfg, bos_id, eos_id), "torch_dtype": dtype_name},
                                                    indent=2))
        gen = {"bos_token_id": bos_id, "eos_token_id": eos_id, "max_length": cfg.max_seq_len}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s to %s (%d safetensors file(s), %.1f MB)", src, out, len(groups), total / 1e6)
    return out


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an old out dir is removed only after the rename."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def export_tokenizer(sp_path: Path, out: Path, cfg: ModelConfig) -> tuple[int, int]:
    """tokenizer.model and a transformers LlamaTokenizer config (plus tokenizer.json when
    transformers can convert it) in `out`; returns (bos_id, eos_id)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    if not sp_path.is_file():
        raise FileNotFoundError(f"{sp_path}: tokenizer model not found; pass tokenizer=<SentencePiece .model>")
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(sp_path.read_bytes())
        sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    except Exception as e:  # protobuf and sentencepiece raise several types
        raise ValueError(f"{sp_path}: not a SentencePiece model ({e}); pass the run's tokenizer .model") from None
    if sp.GetPieceSize() > cfg.vocab_size:
        raise ValueError(f"{sp_path} has {sp.GetPieceSize()} pieces but the model's vocab_size is {cfg.vocab_size}; "
                         f"pass the tokenizer the run was trained with")
    shutil.copyfile(sp_path, out / "tokenizer.model")
    piece = lambda i: sp.IdToPiece(i) if i >= 0 else None  # noqa: E731
    special = {"bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id())}
    if sp.pad_id() >= 0:
        special["pad_token"] = piece(sp.pad_id())
    special = {k: v for k, v in special.items() if v is not None}
    config = {"tokenizer_class": "LlamaTokenizer", **special, "add_bos_token": True, "add_eos_token": False,
              # Our trainer prepends no space to a text; transformers must not either.
              "add_prefix_space": proto.normalizer_spec.add_dummy_prefix, "legacy": False,
              "clean_up_tokenization_spaces": False, "model_max_length": cfg.max_seq_len}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    _add_fast_tokenizer(out, sp)
    return sp.bos_id(), sp.eos_id()


def _add_fast_tokenizer(out: Path, sp) -> None:
    """Convert to tokenizer.json with transformers and check it encodes like SentencePiece; on
    failure keep tokenizer.model only (transformers then converts at load time)."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(out))
        ours = [sp.bos_id()] + sp.Encode(_TOKENIZER_PROBE)
        if tok.encode(_TOKENIZER_PROBE, verbose=False) != ours:
            log.warning("%s: transformers' conversion of the tokenizer encodes differently from SentencePiece; "
                        "use tokenizer.model with sentencepiece directly", out)
            return
        saved = Path(out) / "tokenizer_config.json"
        keep = json.loads(saved.read_text())
        tok.save_pretrained(str(out))
        # save_pretrained writes loader-side keys (is_local, local_files_only): keep our config plus its own.
        merged = {k: v for k, v in json.loads(saved.read_text()).items() if k not in ("is_local", "local_files_only")}
        saved.write_text(json.dumps({**merged, **keep}, indent=2))
    except Exception as e:  # transformers missing, or a conversion it does not support
        log.warning("could not convert the tokenizer for transformers (%s); exported tokenizer.model only", e)


# -- import -----------------------------------------------------------------------------------------
def read_hf_config(hf_dir: Path) -> ModelConfig:
    try:
        hf = json.loads((hf_dir / "config.json").read_text())
        if hf.get("model_type", "llama") != "llama":
            raise ValueError(f"{hf_dir}/config.json is a {hf['model_type']!r} model; only Llama folders can be loaded")
        return from_hf_config(hf)
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{hf_dir}/config.json is not a Llama config ({type(e).__name__}: {e}); re-export it") from None


def _hf_files(hf_dir: Path) -> list[Path]:
    if (hf_dir / INDEX_FILE).is_file():
        weight_map = json.loads((hf_dir / INDEX_FILE).read_text())["weight_map"]
        files = [hf_dir / f for f in dict.fromkeys(weight_map.values())]
    else:
        files = [hf_dir / SINGLE_FILE]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing safetensors file of the Hugging Face folder; re-export or re-download it")
    return files


def _hf_layout(hf_dir: Path, cfg: ModelConfig) -> dict[Path, dict[str, str]]:
    """File -> {our name: HF key}, checked complete and shaped as `cfg` from the headers alone
    (no tensor read), so every rank can refuse a bad folder before any rank loads."""
    shapes, layout, seen = _expected_shapes(cfg), {}, set()
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
                    raise ValueError(f"{f}: unexpected tensor {key!r}; not a Llama checkpoint this model can load") from None
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
    if ckpt.is_complete(path):
        check_same_shape(checkpoint_model_config(path), want, path / ckpt.STATE_FILE)
        ckpt.load_weights_only(path, model)
        return
    check_same_shape(read_hf_config(path), want, path / "config.json")
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


def run_tokenizer(path) -> Path | None:
    """The SentencePiece model that goes with a run dir, checkpoint or HF folder, when one is known:
    an HF folder's tokenizer.model, else `data.tokenizer` of the run's config.yaml."""
    path = Path(path)
    if (path / "tokenizer.model").is_file():
        return path / "tokenizer.model"
    for run_dir in (path, path.parent.parent):  # a run dir, or <run>/checkpoints/step_*
        if (run_dir / "config.yaml").is_file():
            from omegaconf import OmegaConf

            name = OmegaConf.load(run_dir / "config.yaml").get("data", {}).get("tokenizer") or ""
            if name and Path(name).is_file():
                return Path(name)
            if name:
                log.warning("%s names data.tokenizer=%s, which is not a file from here", run_dir / "config.yaml", name)
            return None
    return None
