"""The pipeline's tokenizer, whatever its format (detected from the file itself): a SentencePiece .model (trained
here), a Hugging Face tokenizer.json or a folder holding one, or Meta's tiktoken-format Llama 3 tokenizer.model.
A folder means the same file to every command (folder_tokenizer), and one whose files are different tokenizers
is named in a warning. Also: training a SentencePiece model from the builder's inputs."""

import hashlib
import io
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import sentencepiece as spm

from .disk import write_atomically
from .shard_format import file_sha256
from .tokenizer_hf import configured_specials, hf_files, load_backend
from .tokenizer_tiktoken import LLAMA3_BOS, LLAMA3_EOS, load_llama3, looks_like_tiktoken

# SentencePiece skips training "sentences" longer than this many bytes, so long lines are cut.
MAX_SENTENCE_BYTES = 16384
FORMATS = ("sentencepiece", "huggingface", "tiktoken")
CHAT_TURN_END = "<|eot_id|>"  # Llama 3's end of a chat turn: never the end of a pretraining document
DOCUMENT_END = "<|end_of_text|>"  # ... whose document end is this


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte fallback: one byte
# Text whose whitespace, digits and non-ASCII characters trip tokenizer converters.
TOKENIZER_PROBE = "ROMEO: Wherefore art thou, Romeo?\n  Two  spaces, 12345 digits, héllo ✓ 日本."
log = logging.getLogger("data_pipeline")
_COMPARED: set[tuple] = set()  # the folders whose tokenizer files this process has compared

# The tokenizer files a folder may hold, in the order every command takes them (the builder, training, eval,
# generate, the export, init_from): a Hugging Face folder's tokenizer.json first, as the builder always has.
FOLDER_FILES = ("tokenizer.json", "tokenizer.model", "original/tokenizer.model")
# What launch/export_hf.py writes into an export: it records the sha256 of the tokenizer the model trained with.
EXPORT_MARKER = "llm_pretrain_export.json"


def folder_files(folder: Path) -> list[Path]:
    """The tokenizer files of FOLDER_FILES that `folder` holds, in that order."""
    return [folder / name for name in FOLDER_FILES if (folder / name).is_file()]


def folder_tokenizer(folder: Path) -> Path:
    """The file that is a folder's tokenizer: the first of FOLDER_FILES there, but in an export (EXPORT_MARKER) its
    tokenizer.model, what the run trained with: an export holds a tokenizer.json beside one only as transformers'
    conversion of it (the export of a run trained on a tokenizer.json holds no tokenizer.model)."""
    found = folder_files(folder)
    if not found:
        raise FileNotFoundError(f"{folder}: a folder with no tokenizer.json or tokenizer.model; pass the tokenizer "
                                f"file or the folder that holds it")
    if (folder / EXPORT_MARKER).is_file():
        return next((f for f in found if f.suffix == ".model"), found[0])
    return found[0]


def locate(path: Path) -> tuple[str, Path]:
    """(format, the file that defines the tokenizer) of a tokenizer file or folder, told by the content."""
    if path.is_dir():
        return locate(folder_tokenizer(path))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tokenizer not found; train one with `python -m data_pipeline "
                                f"train-tokenizer`, or pass a tokenizer.json, Llama 3's tokenizer.model or a folder")
    with open(path, "rb") as f:
        head = f.read(4096)
    if path.suffix == ".json" or head.lstrip()[:1] == b"{":
        return "huggingface", path
    return ("tiktoken" if looks_like_tiktoken(head) else "sentencepiece"), path


def _tokenizers_single_threaded() -> bool:
    """Whether `tokenizers` runs batches on the calling thread: TOKENIZERS_PARALLELISM set to a false value."""
    return os.environ.get("TOKENIZERS_PARALLELISM", "true").lower() in ("", "0", "f", "false", "n", "no", "off")


def as_setting(key: str, value: str) -> str:
    """key=value as typed in a shell for a Hydra command line: special tokens such as <|end_of_text|> must reach
    Hydra quoted, so they are shown in quotes."""
    return f"{key}={value}" if re.fullmatch(r"[\w.:/+-]*", value) else f"\"{key}='{value}'\""


def content_sha256(files: list[Path]) -> str:
    """What a tokenizer is, not where it lies: one file's sha256, or the sha256 of the names and sha256s of
    the files that define it (a folder copied elsewhere keeps it; any changed byte changes it)."""
    if len(files) == 1:
        return file_sha256(files[0])
    blob = json.dumps({p.name: file_sha256(p) for p in files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class Tokenizer:
    """A tokenizer with the document markers (BOS/EOS) and the identity the pipeline records.

    BOS and EOS come from the tokenizer's own configuration (the SentencePiece model's ids, tokenizer_config.json,
    Llama 3's <|begin_of_text|>/<|end_of_text|> for its tiktoken file); bos_token/eos_token override them. Where
    that configuration names none, disagrees with itself, or names <|eot_id|> as EOS, it refuses in one line
    naming the key that decides (key_prefix + "bos_token"/"eos_token": `data.` for training, "" for the builder).
    """

    def __init__(self, path, bos_token: str = "", eos_token: str = "", *, key_prefix: str = "data.",
                 compare_others: bool = True):
        self.path = Path(path)
        self._args = (path, bos_token, eos_token, key_prefix)
        self.format, self.file = locate(self.path)
        self.sp = self.backend = None
        configured = getattr(self, f"_load_{self.format}")()
        self.overrides = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v}
        self.bos_token = self._choose("bos_token", bos_token, configured["bos_token"], key_prefix)
        self.eos_token = self._choose("eos_token", eos_token, configured["eos_token"], key_prefix)
        self._check_markers(key_prefix)
        self.bos_id, self.eos_id = self.token_to_id(self.bos_token), self.token_to_id(self.eos_token)
        self.sha256 = content_sha256(self.source_files)
        if compare_others and self.path.is_dir():
            self._warn_if_others_differ(bos_token, eos_token)

    def _warn_if_others_differ(self, bos_token: str, eos_token: str) -> None:
        """A folder's other tokenizer files should be this tokenizer in another format (a Meta download's
        original/tokenizer.model, an export's tokenizer.json): one that is not is named in a warning (rank 0)."""
        files = folder_files(self.path)
        seen = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size, bos_token, eos_token) for f in files)
        if os.environ.get("RANK", "0") != "0" or seen in _COMPARED:  # said once a process (a tiktoken file: ~2 s)
            return
        _COMPARED.add(seen)
        for other in (f for f in files if f != self.file):
            try:
                why = self.difference(Tokenizer(other, bos_token, eos_token, compare_others=False))
            except (ValueError, OSError) as e:
                why = str(e)
            if why:
                log.warning("warning: %s holds %s and %s, which are not the same tokenizer (%s); using %s, as every "
                            "command does: pass the file itself to use the other", self.path,
                            self.file.relative_to(self.path), other.relative_to(self.path), why,
                            self.file.relative_to(self.path))

    def difference(self, other: "Tokenizer") -> str | None:
        """How two tokenizers (of any formats) differ in what a model sees: vocabulary size, BOS and EOS ids, the
        ids of a probe text; None when they agree (a tiktoken file and the tokenizer.json of the same BPE do)."""
        for what, x, y in (("vocabulary size", self.vocab_size, other.vocab_size), ("BOS id", self.bos_id,
                           other.bos_id), ("EOS id", self.eos_id, other.eos_id)):
            if x != y:
                return f"{what} {x} vs {y}"
        ids_a, ids_b = self.encode(TOKENIZER_PROBE), other.encode(TOKENIZER_PROBE)
        if ids_a != ids_b:
            at = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), min(len(ids_a), len(ids_b)))
            return f"the probe text {TOKENIZER_PROBE[:24]!r}... gets other ids from token {at} on"
        return None

    def _load_sentencepiece(self) -> dict:
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.file))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.file}: not a SentencePiece model ({e}); retrain or fix the path") from None
        self.vocab_size, self.source_files = self.sp.GetPieceSize(), [self.file]
        ids = {"bos_token": self.sp.bos_id(), "eos_token": self.sp.eos_id()}
        return {k: {"the model": self.sp.IdToPiece(i)} if i >= 0 else {} for k, i in ids.items()}

    def _load_huggingface(self) -> dict:
        self.source_files = hf_files(self.file)
        self._set_backend(load_backend(self.file))
        return configured_specials(self.source_files)

    def _load_tiktoken(self) -> dict:
        self.source_files = [self.file]
        self._set_backend(load_llama3(self.file))
        return {"bos_token": {"Llama 3": LLAMA3_BOS}, "eos_token": {"Llama 3": LLAMA3_EOS}}

    def _set_backend(self, backend):
        # A document's text that spells a special token (say "<|end_of_text|>") is text, never a marker.
        backend.encode_special_tokens = True
        self.backend = backend
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1

    def _choose(self, key: str, explicit: str, configured: dict[str, str], key_prefix: str) -> str:
        """The token string for BOS or EOS: the override, else the one the configuration names."""
        setting = f"{key_prefix}{key}"
        if explicit:
            if self.token_to_id(explicit) is None:
                raise ValueError(f"{setting}={explicit} is not a token of {self.file}; pass one of its special tokens")
            return explicit
        what = "starts" if key == "bos_token" else "ends"
        if not configured:
            raise ValueError(f"{self.path}: its configuration names no {key} (the token that {what} each document); "
                             f"pass {as_setting(setting, '<that token>')}")
        if len(set(configured.values())) > 1:
            said = ", ".join(f"{where} says {name}" for where, name in configured.items())
            raise ValueError(f"{self.path}: ambiguous {key} ({said}); pass {as_setting(setting, '<token>')}, the "
                             f"token that {what} each document")
        where, name = next(iter(configured.items()))
        if self.token_to_id(name) is None:
            raise ValueError(f"{self.path}: {where} names {key} {name}, which is not in the vocabulary; "
                             f"pass {as_setting(setting, '<token>')}, the token that {what} each document")
        return name

    def _check_markers(self, key_prefix: str):
        """Documents are cut at BOS and counted by it: EOS must be a document end, distinct from BOS."""
        if self.eos_token == CHAT_TURN_END:
            end = DOCUMENT_END if self.token_to_id(DOCUMENT_END) is not None else "<the document end token>"
            raise ValueError(f"{self.path}: eos_token is {CHAT_TURN_END}, the end of a chat turn (an Instruct model's "
                             f"config), not of a document: pretraining on it degrades the model; "
                             f"pass {as_setting(key_prefix + 'eos_token', end)}")
        if self.bos_token == self.eos_token:
            raise ValueError(f"{self.path}: bos_token and eos_token are both {self.bos_token}, so documents could "
                             f"not be told apart; pass {key_prefix}bos_token= and {key_prefix}eos_token= "
                             f"as two different tokens")

    def __getstate__(self):  # for spawned builder workers: load again from the files, then check they are the same
        return {"args": self._args, "sha256": self.sha256}

    def __setstate__(self, state):
        self.__init__(*state["args"][:3], key_prefix=state["args"][3], compare_others=False)
        if self.sha256 != state["sha256"]:
            raise ValueError(f"{self.path} changed while in use (sha256 {self.sha256[:12]}, was "
                             f"{state['sha256'][:12]}); run again")

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without BOS/EOS."""
        if self.sp is not None:
            return self.sp.Encode(text)
        return self.backend.encode_batch_fast([text], add_special_tokens=False)[0].ids

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """Token ids of many texts. One thread by default (parallelism comes from processes); more threads: the
        library's own pool (SentencePiece: num_threads; tokenizers: its pool of RAYON_NUM_THREADS threads)."""
        if self.sp is not None:
            return self.sp.Encode(texts, num_threads=num_threads)
        if num_threads == 1 and not _tokenizers_single_threaded():
            # one text per call: the pool works on one text at a time, so on one core (a batch call is ~10% cheaper
            # in CPU time, which the builder's workers get: they turn the pool off)
            return [self.backend.encode_batch_fast([t], add_special_tokens=False)[0].ids for t in texts]
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        """Text of token ids; special tokens (BOS/EOS among them) are dropped."""
        ids = [int(i) for i in ids]
        return self.sp.Decode(ids) if self.sp is not None else self.backend.decode(ids, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (a special token's name, a SentencePiece piece); None if it is not one."""
        if self.sp is None:
            return self.backend.token_to_id(token)
        i = self.sp.PieceToId(token)
        return i if self.sp.IdToPiece(i) == token else None

    def id_to_token(self, i: int) -> str | None:
        """The token string of an id; None outside the vocabulary."""
        if not 0 <= i < self.vocab_size:
            return None
        return self.sp.IdToPiece(i) if self.sp is not None else self.backend.id_to_token(i)

    def token_bytes(self) -> tuple[np.ndarray, bool]:
        """The UTF-8 bytes of text each id stands for (special tokens 0), for bits per byte; and whether encoding
        adds a space before a text's first word (SentencePiece's dummy prefix), one byte the text lacks."""
        if self.sp is not None:
            special = [self.sp.IsControl(i) or self.sp.IsUnknown(i) for i in range(self.vocab_size)]
            pieces = [self.sp.IdToPiece(i) for i in range(self.vocab_size)]
            byte_level = False
        else:  # tokenizer.json, Llama 3's tiktoken file
            added = self.backend.get_added_tokens_decoder()
            special = [i in added and added[i].special for i in range(self.vocab_size)]
            pieces = [self.backend.id_to_token(i) or "" for i in range(self.vocab_size)]
            byte_level = type(self.backend.decoder).__name__ == "ByteLevel"  # one character per byte
        n = np.array([0 if skip else 1 if _BYTE_PIECE.fullmatch(piece) else len(piece) if byte_level
                      else len(piece.replace("\u2581", " ").encode()) for skip, piece in zip(special, pieces)])
        return n, int(n[self.encode("a")].sum()) > 1

    def identity(self) -> dict:
        """What a manifest records about this tokenizer."""
        return {"sha256": self.sha256, "path": str(self.path), "format": self.format, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "bos_token": self.bos_token, "eos_token": self.eos_token}

    def __repr__(self):
        return (f"Tokenizer({str(self.path)!r}, format={self.format}, vocab_size={self.vocab_size}, "
                f"sha256={self.sha256[:12]})")


def _training_sentences(documents, max_chars: int):
    """Lines of the documents, long ones cut at spaces to fit SentencePiece's limit, until max_chars are used."""
    limit = MAX_SENTENCE_BYTES // 4  # characters: 4 bytes is the widest UTF-8 character
    used = 0
    for doc in documents:
        for line in doc.split("\n"):
            while line.strip():
                cut = len(line)
                if cut > limit:
                    cut = line.rfind(" ", 1, limit) if " " in line[1:limit] else limit
                used += cut
                yield line[:cut]
                if used >= max_chars:
                    return
                line = line[cut:]


def _check_model_path(model_path: Path, overwrite: bool):
    """Refuse, before any work, to replace a file that is not ours to replace: the tokenizer of an existing shard
    set or run is found by its path, and a different model there would silently change what its ids mean."""
    if model_path.is_dir():
        raise IsADirectoryError(f"model_path={model_path} is a folder; give the path of the .model file to write")
    if model_path.exists() and not overwrite:
        raise FileExistsError(f"model_path={model_path} already exists (shard sets and runs may use it); "
                              f"choose another model_path or pass overwrite=true to replace it")


def train_tokenizer(inputs: list[str], model_path, vocab_size: int, text_field: str = "text",
                    txt_mode: str = "file", max_chars: int = 200_000_000, seed: int = 0,
                    num_threads: int | None = None, overwrite: bool = False,
                    encoding_errors: str = "strict") -> Tokenizer:
    """Train a BPE SentencePiece model with byte fallback on the inputs; write model_path atomically.
    An existing model_path is replaced only with overwrite=True."""
    from .sources import load_documents, sample_documents  # datasets is heavy: import when needed

    model_path = Path(model_path)
    _check_model_path(model_path, overwrite)
    docs = load_documents(inputs, text_field=text_field, txt_mode=txt_mode, encoding_errors=encoding_errors)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=_training_sentences(sample_documents(docs, seed), max_chars),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,  # any UTF-8 text encodes without <unk>
            character_coverage=0.9995,
            # identity normalisation and kept whitespace: decode(encode(text)) == text exactly
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=MAX_SENTENCE_BYTES,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=num_threads or os.cpu_count(),
            minloglevel=2,
        )
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1]
        raise ValueError(f"{model_path}: SentencePiece training failed ({msg}); "
                         f"try a smaller vocab_size or more input text") from None
    write_atomically(model_path, model.getvalue())  # readers see the old model or the new one, never half of one
    return Tokenizer(model_path)
