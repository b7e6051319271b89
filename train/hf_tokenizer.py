"""The tokenizer half of a Hugging Face export (our SentencePiece model as a transformers
LlamaTokenizer, checked to encode alike), finding the SentencePiece model that goes with a run, and
checking it is the one the run trained with.

An exported folder gets `tokenizer.model`, `tokenizer_config.json`, `special_tokens_map.json` and,
when transformers converts it faithfully, `tokenizer.json`.
"""

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from data_pipeline.disk import NO_SPACE
from data_pipeline.shard_format import file_sha256
from model import ModelConfig

from .checkpoint_io import STATE_FILE, is_complete, read_train_state

log = logging.getLogger("train")

# What every export holds besides the model: where it came from, the sha256 of its tokenizer and its file names.
EXPORT_MARKER = "llm_pretrain_export.json"

# Text whose whitespace, digits and non-ASCII characters trip tokenizer converters.
_TOKENIZER_PROBE = "ROMEO: Wherefore art thou, Romeo?\n  Two  spaces, 12345 digits, héllo ✓ 日本."


@contextlib.contextmanager
def writing(path: Path):
    """Around the writes of one export file: a failure for want of space (a full disk, a quota, a file-size
    limit) comes out as an OSError naming `path` (a failed write() names no file, shutil.copyfile names its
    source, and safetensors' writer reports its I/O error as text, "... (os error 28)")."""
    try:
        yield
    except Exception as e:
        found = re.search(r"os error (\d+)", str(e)) if not isinstance(e, OSError) else None
        code = int(found.group(1)) if found else getattr(e, "errno", None)
        if code in NO_SPACE:
            raise OSError(code, os.strerror(code), str(path)) from e
        raise


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
    with writing(out / "tokenizer.model"):
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
    for name, value in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with writing(out / name):
            (out / name).write_text(json.dumps(value, indent=2))
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
        with writing(out / "tokenizer.json"):  # the large one of the files it writes
            tok.save_pretrained(str(out))
        # save_pretrained writes loader-side keys (is_local, local_files_only): keep our config plus its own.
        merged = {k: v for k, v in json.loads(saved.read_text()).items() if k not in ("is_local", "local_files_only")}
        with writing(saved):
            saved.write_text(json.dumps({**merged, **keep}, indent=2))
    except Exception as e:  # transformers missing, or a conversion it does not support
        if isinstance(e, OSError) and e.errno in NO_SPACE:  # a full disk: fail the export, never ship half a file
            raise
        log.warning("could not convert the tokenizer for transformers (%s); exported tokenizer.model only", e)


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


def trained_tokenizer_sha256(source: Path) -> str | None:
    """The sha256 of the tokenizer `source` was trained with, where it is recorded: a DCP checkpoint's
    train_state.json fingerprint, or an export's marker file (a downloaded HF folder records none)."""
    if is_complete(source):
        return read_train_state(source).get("fingerprint", {}).get("tokenizer_sha256")
    marker = source / EXPORT_MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text()).get("tokenizer_sha256")
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{marker} is damaged (not a JSON object); re-export the folder") from None


def check_tokenizer(sp_path: Path, source: Path) -> str:
    """sp_path's sha256, after checking that it is the tokenizer `source` was trained with (when recorded):
    a file replaced since, with other ids for the same text, would export or sample garbage."""
    if not sp_path.is_file():
        raise FileNotFoundError(f"{sp_path}: tokenizer model not found; pass tokenizer=<SentencePiece .model>")
    have, want = file_sha256(sp_path), trained_tokenizer_sha256(source)
    if want and have != want:
        where = source / STATE_FILE if is_complete(source) else source / EXPORT_MARKER
        raise ValueError(f"{sp_path} is not the tokenizer the model was trained with (sha256 {have[:12]}, but {where} "
                         f"records {want[:12]}); the file was replaced: restore it, or pass tokenizer=<the .model "
                         f"the run trained with>")
    return have
