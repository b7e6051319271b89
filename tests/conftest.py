"""Shared pytest fixtures: offline hub, a real sample corpus, a small real tokenizer and shard set."""

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# before `datasets` is imported anywhere: never touch the network, keep its cache out of $HOME
os.environ["HF_HUB_OFFLINE"] = "1"
if "HF_DATASETS_CACHE" not in os.environ:
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="hf-datasets-test-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]
SHARED_CORPORA = REPO.parent / "shared" / "corpora"


@pytest.fixture(scope="session")
def sample_corpus() -> Path:
    """Folder of real Shakespeare .txt files (shared copy or cached download)."""
    from data_pipeline.sample_corpus import sample_corpus_dir
    return sample_corpus_dir()


@pytest.fixture(scope="session")
def shared_corpora() -> Path:
    """../shared/corpora (jsonl, folder of .txt, single .txt) or skip."""
    if not (SHARED_CORPORA / "sotu.jsonl").is_file():
        pytest.skip(f"{SHARED_CORPORA} not present (fresh clone)")
    return SHARED_CORPORA


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, sample_corpus) -> dict:
    """About 1.5 MB of real text in three layouts: a folder of .txt works, a .jsonl of scenes, one-line-per-doc .txt."""
    root = tmp_path_factory.mktemp("small_corpus")
    plays = sorted(sample_corpus.glob("*.txt"))
    (root / "works").mkdir()
    for p in plays[:4]:
        (root / "works" / p.name).write_text(p.read_text(encoding="utf-8"), encoding="utf-8")
    scenes = [s for p in plays[4:7] for s in p.read_text(encoding="utf-8").split("\n\n\n") if s.strip()]
    with open(root / "scenes.jsonl", "w", encoding="utf-8") as f:
        for i, s in enumerate(scenes):
            f.write(json.dumps({"id": i, "text": s}) + "\n")
    lines = [ln for ln in plays[7].read_text(encoding="utf-8").splitlines() if ln.strip()]
    (root / "lines.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"root": root, "works": root / "works", "jsonl": root / "scenes.jsonl", "lines": root / "lines.txt"}


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory, small_corpus):
    """A real 2000-piece BPE SentencePiece model trained on the small corpus (once per session)."""
    from data_pipeline.tokenizer import train_tokenizer
    path = tmp_path_factory.mktemp("tokenizer") / "test.model"
    return train_tokenizer([str(small_corpus["works"]), str(small_corpus["jsonl"])], path, vocab_size=2000,
                           max_chars=1_500_000)


@pytest.fixture(scope="session")
def shards(tmp_path_factory, small_corpus, tokenizer) -> Path:
    """A shard set of the small corpus's works and scenes: 10% validation, many small shards."""
    from data_pipeline.build import build_shards
    out = tmp_path_factory.mktemp("shards") / "set"
    build_shards([str(small_corpus["works"]), str(small_corpus["jsonl"])], out, tokenizer,
                 val_fraction=0.1, shard_tokens=40_000, num_proc=1, progress=False)
    return out
