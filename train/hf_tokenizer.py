"""The tokenizer half of a Hugging Face export (our SentencePiece model as a transformers
LlamaTokenizer, checked to encode alike), and finding the SentencePiece model that goes with a run.

An exported folder gets `tokenizer.model`, `tokenizer_config.json`, `special_tokens_map.json` and,
when transformers converts it faithfully, `tokenizer.json`.
"""

import json
import logging
import shutil
from pathlib import Path

from model import ModelConfig

log = logging.getLogger("train")

# Text whose whitespace, digits and non-ASCII characters trip tokenizer converters.
_TOKENIZER_PROBE = "ROMEO: Wherefore art thou, Romeo?\n  Two  spaces, 12345 digits, héllo ✓ 日本."


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
