"""Demo data in one call: a tokenizer and shards from the sample corpus, made once and reused."""

from pathlib import Path

from .build import build_shards
from .locking import file_lock
from .sample_corpus import sample_corpus_dir
from .tokenizer import Tokenizer, train_tokenizer


def ensure_demo_data(out_dir, vocab_size: int = 8192, val_fraction: float = 0.1,
                     shard_tokens: int = 1 << 24, progress: bool = True) -> tuple[Path, Path]:
    """Return (tokenizer model path, shards dir) under out_dir, training/building whatever is missing.

    Safe to call from every rank at once: an fcntl lock on out_dir/.lock lets one process build
    while the others wait, then they all find the finished files.
    """
    out_dir = Path(out_dir)
    model_path = out_dir / f"tokenizer_{vocab_size}.model"
    shards_dir = out_dir / f"shards_{vocab_size}"
    with file_lock(out_dir / ".lock"):
        corpus = [str(sample_corpus_dir())]
        tokenizer = Tokenizer(model_path) if model_path.is_file() else \
            train_tokenizer(corpus, model_path, vocab_size, txt_mode="file")
        # build_shards is a no-op when a finished build of the same inputs and tokenizer is there
        build_shards(corpus, shards_dir, tokenizer, txt_mode="file", val_fraction=val_fraction,
                     shard_tokens=shard_tokens, overwrite=True, progress=progress)
    return model_path, shards_dir
