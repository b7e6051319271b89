"""The tokenizer half of a Hugging Face export, finding the tokenizer that goes with a run or a checkpoint,
and checking it is the one the run trained with (or, for `init_from`, the one the source was trained with).

What an export gets, by the run's tokenizer format:
- SentencePiece: `tokenizer.model`, `tokenizer_config.json`, `special_tokens_map.json` (a transformers
  LlamaTokenizer) and, when transformers converts it faithfully, `tokenizer.json`;
- a Hugging Face tokenizer (tokenizer.json): its files, copied unchanged;
- Meta's tiktoken `tokenizer.model`: the file unchanged as `original/tokenizer.model` (where Meta's Hugging Face
  releases keep it), and the same BPE as `tokenizer.json` plus a `tokenizer_config.json` naming BOS and EOS.
Each format's `tokenizer_config.json` carries the run's chat template as `chat_template` where it has one (its
data.template file, else the tokenizer's own), so that transformers' apply_chat_template renders as training did.
"""

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from data_pipeline.disk import NO_SPACE
from data_pipeline.tokenizer import EXPORT_MARKER, TOKENIZER_PROBE, folder_files
from model import ModelConfig

from ..state.checkpoint_io import STATE_FILE, is_complete, read_train_state

log = logging.getLogger("train")


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


def open_tokenizer(path: Path, bos_token: str = "", eos_token: str = ""):
    """The data pipeline's Tokenizer of a file or folder, whatever its format."""
    from data_pipeline.tokenizer import Tokenizer

    return Tokenizer(path, bos_token=bos_token, eos_token=eos_token)


def export_tokenizer(tok_path: Path, out: Path, model_cfg: ModelConfig, bos_token: str = "",
                     eos_token: str = "", chat_template: str | None = None) -> tuple[int, int]:
    """The tokenizer files of `tok_path` (any format) for transformers, in `out`, with `chat_template` (its text)
    in tokenizer_config.json where given; returns (bos_id, eos_id)."""
    if not tok_path.exists():
        raise FileNotFoundError(f"{tok_path}: tokenizer not found; pass tokenizer=<the run's data.tokenizer>")
    tok = open_tokenizer(tok_path, bos_token, eos_token)
    if tok.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"{tok_path} has {tok.vocab_size} tokens but the model's vocab_size is "
                         f"{model_cfg.vocab_size}; pass the tokenizer the run was trained with")
    ids = tok.bos_id, tok.eos_id
    if tok.format == "sentencepiece":
        ids = _export_sentencepiece(Path(tok.path), out, model_cfg)
    elif tok.format == "huggingface":
        for f in tok.source_files:  # tokenizer.json, tokenizer_config.json, special_tokens_map.json, as they are
            with writing(out / Path(f).name):
                shutil.copyfile(f, out / Path(f).name)
    else:
        _export_tiktoken(tok, out, model_cfg)
    if chat_template is not None:
        _add_chat_template(out / "tokenizer_config.json", chat_template)
    return ids


def chat_template_for(tok_path: Path, template: str = "", bos_token: str = "", eos_token: str = "") -> str | None:
    """The chat template to write into an export of `tok_path`: the file `template` names (a missing one fails),
    else the tokenizer's own (chat_template.jinja, or tokenizer_config.json's chat_template beside a SentencePiece
    or tiktoken file); None where it has none, or where the tokenizer_config.json the export copies holds it."""
    from data_pipeline.chat import read_template

    tok = open_tokenizer(tok_path, bos_token, eos_token)
    if template:
        return read_template(tok, template)[0]  # a missing file fails in one line
    try:
        text, source = read_template(tok)
    except ValueError:  # the tokenizer has none: a base model's export, with no chat template
        return None
    # A tokenizer.json's tokenizer_config.json is copied as it is, its templates (a named list too) with it.
    return None if tok.format == "huggingface" and source in map(str, tok.source_files) else text


def _add_chat_template(config_path: Path, template: str) -> None:
    """tokenizer_config.json with `chat_template` set (written alone where the tokenizer came without one)."""
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    with writing(config_path):
        config_path.write_text(json.dumps({**config, "chat_template": template}, indent=2), encoding="utf-8")


def _export_tiktoken(tok, out: Path, model_cfg: ModelConfig) -> None:
    """original/tokenizer.model unchanged; tokenizer.json of the same BPE with the post-processor Meta's Hugging
    Face releases have (it adds BOS, so transformers encodes a text as the Llama 3 release does); a config
    naming BOS and EOS."""
    from tokenizers import Tokenizer, processors

    (out / "original").mkdir()
    with writing(out / "original" / "tokenizer.model"):
        shutil.copyfile(tok.source_files[0], out / "original" / "tokenizer.model")
    backend = Tokenizer.from_str(tok.backend.to_str())  # a copy: the post-processor is the export's
    bos = tok.id_to_token(tok.bos_id)
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, tok.bos_id)])])
    with writing(out / "tokenizer.json"):
        backend.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": tok.id_to_token(tok.eos_id),
              # Decoding gives back the text as it was (no clean-up of spaces before punctuation), as our decode does.
              "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids", "attention_mask"],
              "model_max_length": model_cfg.max_seq_len}
    with writing(out / "tokenizer_config.json"):
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _export_sentencepiece(sp_path: Path, out: Path, model_cfg: ModelConfig) -> tuple[int, int]:
    """tokenizer.model and a transformers LlamaTokenizer config (plus tokenizer.json when
    transformers can convert it) in `out`; returns (bos_id, eos_id)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(sp_path.read_bytes())
        sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    except Exception as e:  # protobuf and sentencepiece raise several types
        raise ValueError(f"{sp_path}: not a SentencePiece model ({e}); pass the run's tokenizer .model") from None
    if sp.GetPieceSize() > model_cfg.vocab_size:
        raise ValueError(f"{sp_path} has {sp.GetPieceSize()} pieces but the model's vocab_size is "
                         f"{model_cfg.vocab_size}; pass the tokenizer the run was trained with")
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
              "clean_up_tokenization_spaces": False, "model_max_length": model_cfg.max_seq_len}
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
        ours = [sp.bos_id()] + sp.Encode(TOKENIZER_PROBE)
        if tok.encode(TOKENIZER_PROBE, verbose=False) != ours:
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
    """The tokenizer that goes with a run dir, checkpoint, HF or Meta folder, when one is known: the folder itself
    where it holds one (data_pipeline.tokenizer.folder_tokenizer decides which file, as for every command), else
    `data.tokenizer` of the run's config.yaml."""
    path = Path(path)
    if folder_files(path):
        return path
    config, data = _run_data(path)
    name = data.get("tokenizer") or ""
    if name and Path(name).exists():
        return Path(name)
    if name:
        log.warning("%s names data.tokenizer=%s, which is not there from here", config, name)
    return None


def run_template(path) -> str:
    """data.template of the run a run dir or checkpoint belongs to: the chat template file its shards were built
    with ("" where not set: the tokenizer's own)."""
    return _run_data(Path(path))[1].get("template") or ""


def run_markers(path) -> tuple[str, str]:
    """(data.bos_token, data.eos_token) of the run a run dir or checkpoint belongs to ("" where not set)."""
    _, data = _run_data(Path(path))
    return data.get("bos_token") or "", data.get("eos_token") or ""


def _run_data(path: Path) -> tuple[Path | None, dict]:
    """(config.yaml, its data section) of a run dir, or of the run of <run>/checkpoints/step_*."""
    for run_dir in (path, path.parent.parent):
        if (run_dir / "config.yaml").is_file():
            from omegaconf import OmegaConf

            return run_dir / "config.yaml", dict(OmegaConf.load(run_dir / "config.yaml").get("data", {}))
    return None, {}


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


def check_tokenizer(tok_path: Path, source: Path, bos_token: str = "", eos_token: str = "") -> str:
    """tok_path's content sha256, after checking that it is the tokenizer `source` was trained with (when
    recorded), or the same one in another format: a file replaced since, with other ids for the same text, would
    export or sample garbage."""
    if not tok_path.exists():
        raise FileNotFoundError(f"{tok_path}: tokenizer not found; pass tokenizer=<the run's data.tokenizer>")
    given = open_tokenizer(tok_path, bos_token, eos_token)
    have, want = given.sha256, trained_tokenizer_sha256(source)
    if want and have != want and not _same_as_recorded(given, source, want, bos_token, eos_token):
        where = source / STATE_FILE if is_complete(source) else source / EXPORT_MARKER
        raise ValueError(f"{tok_path} is not the tokenizer the model was trained with (sha256 {have[:12]}, but {where} "
                         f"records {want[:12]}); the file was replaced: restore it, or pass tokenizer=<the tokenizer "
                         f"the run trained with>")
    return have


def _same_as_recorded(given, source: Path, want: str, bos_token: str, eos_token: str) -> bool:
    """Whether `given` is, in another format, the tokenizer `source` records (say Meta's tiktoken file for a run
    trained on the tokenizer.json of the same BPE): the run's own tokenizer must still be there, unchanged."""
    recorded = run_tokenizer(source)
    if recorded is None:
        return False
    try:
        recorded = open_tokenizer(recorded, bos_token, eos_token)
    except (ValueError, OSError):
        return False
    return recorded.sha256 == want and tokenizer_difference(recorded, given) is None


def tokenizer_difference(a, b) -> str | None:
    """How two tokenizers (of any formats) differ in what a model sees (data_pipeline's Tokenizer.difference)."""
    return a.difference(b)


def check_source_tokenizer(source: Path, rows: int, tokenizer, model_vocab: int) -> None:
    """For init_from: the source's tokenizer, where it has one, must be `tokenizer` (the shards'), and the source's
    embedding needs a row per token (exactly, unless the model pads its vocabulary beyond the tokenizer's)."""
    theirs = _source_tokenizer(source, tokenizer)
    if theirs is not None:
        difference = tokenizer_difference(theirs, tokenizer)
        if difference:
            raise ValueError(f"checkpoint.init_from={source} comes with the tokenizer {theirs.file}, but the shards "
                             f"were built with data.tokenizer={tokenizer.path}, another one ({difference}); build the "
                             f"shards with tokenizer={theirs.path}")
    if rows < tokenizer.vocab_size or (rows != tokenizer.vocab_size and model_vocab == tokenizer.vocab_size):
        raise ValueError(f"checkpoint.init_from={source} has {rows} embedding rows but data.tokenizer="
                         f"{tokenizer.path} has {tokenizer.vocab_size} tokens; build the shards with the tokenizer "
                         f"the checkpoint was trained with")


def _source_tokenizer(source: Path, like):
    """The tokenizer an init_from source comes with, opened (None: none known, or the recorded sha256 is
    `like`'s). Markers its own config leaves ambiguous are taken as `like`'s, so that only the files differ."""
    if is_complete(source) and trained_tokenizer_sha256(source) in (None, like.sha256):
        return None
    # A folder's own files, or the data.tokenizer of the run a DCP checkpoint belongs to.
    path = run_tokenizer(source) if is_complete(source) or folder_files(source) else None
    if path is None:
        if is_complete(source):
            raise ValueError(f"checkpoint.init_from={source} was trained with another tokenizer (sha256 "
                             f"{trained_tokenizer_sha256(source)[:12]}) than data.tokenizer={like.path} "
                             f"({like.sha256[:12]}); build the shards with the tokenizer of that run")
        return None
    try:
        return open_tokenizer(path)
    except ValueError:
        try:
            return open_tokenizer(path, like.id_to_token(like.bos_id), like.id_to_token(like.eos_id))
        except ValueError as e:
            raise ValueError(f"checkpoint.init_from={source}: its tokenizer cannot be compared with data.tokenizer="
                             f"{like.path} ({e})") from None
