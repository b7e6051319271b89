"""Export of a DCP checkpoint (any world size) as a Hugging Face transformers Llama folder.

The folder holds `config.json`, `model.safetensors` (or `model-0000i-of-0000n.safetensors` shards
plus `model.safetensors.index.json`), `generation_config.json` and, when a SentencePiece model is
given, the tokenizer files of train/hf_tokenizer.py. It is written beside `out_dir` and renamed into
place, so a failed export leaves no half folder.
"""

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from model import ModelConfig
from model.hf import to_hf_config, to_hf_key

from .hf_tokenizer import export_tokenizer
from .offline_checkpoint import (INDEX_FILE, SINGLE_FILE, checkpoint_dtypes, checkpoint_model_config,
                                 expected_shapes, read_checkpoint)

log = logging.getLogger("train")


def export_hf(checkpoint_dir, out_dir, tokenizer_path=None, max_shard_bytes: int = 5 * 2**30,
              dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write a DCP checkpoint (any world size) as a transformers Llama folder; returns out_dir.

    Tensors are read one output shard at a time, so memory peaks at about one shard."""
    src, out = Path(checkpoint_dir), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pick another out dir or pass overwrite=true")
    cfg = checkpoint_model_config(src)
    dtypes = checkpoint_dtypes(src, cfg)  # checks the checkpoint before anything is written
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        bos_id = eos_id = None
        if tokenizer_path is not None:
            bos_id, eos_id = export_tokenizer(Path(tokenizer_path), tmp, cfg)
        out_dtype, n_files, total = _write_weights(src, cfg, dtypes, tmp, max_shard_bytes, dtype)
        config = {**to_hf_config(cfg, bos_id, eos_id), "torch_dtype": str(out_dtype).removeprefix("torch.")}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        gen = {"bos_token_id": bos_id, "eos_token_id": eos_id, "max_length": cfg.max_seq_len}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s to %s (%d safetensors file(s), %.1f MB)", src, out, n_files, total / 1e6)
    return out


def _write_weights(src: Path, cfg: ModelConfig, dtypes: dict[str, torch.dtype], tmp: Path, max_shard_bytes: int,
                   dtype: torch.dtype | None) -> tuple[torch.dtype, int, int]:
    """The safetensors file(s) (and index) in `tmp`, one output shard read at a time; returns
    (dtype of the first tensor written, number of files, bytes written)."""
    shapes = expected_shapes(cfg)
    out_dtypes = {n: dtype or d for n, d in dtypes.items()}
    groups = _plan_shards(shapes, out_dtypes, max_shard_bytes)
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        fname = SINGLE_FILE if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        part = read_checkpoint(src, names, shapes, dtypes)
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
    return next(iter(out_dtypes.values())), len(groups), total


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


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an old out dir is removed only after the rename."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
