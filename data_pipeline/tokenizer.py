"""SentencePiece tokenizer: train one from the builder's inputs, load one, hash it."""

import io
import os
from pathlib import Path

import sentencepiece as spm

from .disk import write_atomically
from .shard_format import file_sha256

# SentencePiece skips training "sentences" longer than this many bytes, so long lines are cut.
MAX_SENTENCE_BYTES = 16384


class Tokenizer:
    """A SentencePiece model file with the ids and identity the pipeline records."""

    def __init__(self, model_path):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: tokenizer model not found; train one with "
                                    f"`python -m data_pipeline train-tokenizer` or fix the path")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.path}: not a SentencePiece model ({e}); retrain or fix the path") from None
        self.vocab_size = self.sp.GetPieceSize()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{self.path}: model has no BOS/EOS ids; retrain it with train_tokenizer")
        self.sha256 = file_sha256(self.path)

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without BOS/EOS."""
        return self.sp.Encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """Token ids of many texts (one thread by default: parallelism comes from processes)."""
        return self.sp.Encode(texts, num_threads=num_threads)

    def decode(self, ids) -> str:
        """Text of token ids; BOS/EOS are dropped."""
        return self.sp.Decode([int(i) for i in ids])

    def identity(self) -> dict:
        """What a manifest records about this tokenizer."""
        return {"sha256": self.sha256, "path": str(self.path), "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id}

    def __repr__(self):
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


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
