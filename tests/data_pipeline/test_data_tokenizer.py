"""Tokenizer: exact round trip on real text, recorded ids and hash, atomic write, CLI training."""

import hashlib
import resource
import signal
import subprocess
import sys

import pytest

from data_pipeline.tokenizer import Tokenizer, train_tokenizer


def test_round_trip_and_special_ids(tokenizer, sample_corpus):
    text = sorted(sample_corpus.glob("*.txt"))[-1].read_text(encoding="utf-8")[:20_000]
    text += "\n  naïve café — 東京 🙂\t tabs\n"  # characters the training text lacks: byte fallback
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.sp.unk_id() not in ids  # byte fallback: nothing becomes <unk>
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2) and tokenizer.vocab_size == 2000
    assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids  # encode adds no BOS/EOS
    assert len(ids) < len(text.encode()) / 2  # it learned merges, not just bytes


def test_hash_is_the_model_file_sha256(tokenizer):
    assert tokenizer.sha256 == hashlib.sha256(tokenizer.path.read_bytes()).hexdigest()
    assert Tokenizer(tokenizer.path).sha256 == tokenizer.sha256


def test_training_writes_atomically_and_reproducibly(tmp_path, small_corpus):
    a = train_tokenizer([str(small_corpus["lines"])], tmp_path / "a.model", vocab_size=500)
    b = train_tokenizer([str(small_corpus["lines"])], tmp_path / "b.model", vocab_size=500)
    assert a.sha256 == b.sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.model", "b.model"]  # no temp files left


def test_bad_model_file_and_oversized_vocab(tmp_path, small_corpus):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model"):
        Tokenizer(junk)
    with pytest.raises(FileNotFoundError, match="absent.model"):
        Tokenizer(tmp_path / "absent.model")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer([str(small_corpus["lines"])], tmp_path / "big.model", vocab_size=200_000)
    assert not (tmp_path / "big.model").exists()


def test_cli_train_tokenizer_then_build(tmp_path, small_corpus):
    model = tmp_path / "cli.model"
    def run(*a):
        return subprocess.run([sys.executable, "-m", "data_pipeline", *a], capture_output=True, text=True)

    r = run("train-tokenizer", f"inputs=[{small_corpus['lines']}]", f"model_path={model}", "vocab_size=400",
            "txt_mode=line")
    assert r.returncode == 0, r.stderr
    r = run("build", f"inputs=[{small_corpus['lines']}]", f"out_dir={tmp_path / 'out'}", f"tokenizer={model}",
            "txt_mode=line", "val_fraction=0.1", "num_proc=2")
    assert r.returncode == 0, r.stderr
    r = run("verify", f"out_dir={tmp_path / 'out'}", f"tokenizer={model}")
    assert r.returncode == 0 and r.stdout.count("ok ") == 2, r.stderr


def limit_file_size_to_2kb() -> None:
    """preexec_fn: writes past 2 kB fail with EFBIG (a model of 420 pieces is ~7 kB), like a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead of failing the write
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_000, 2_000))


def test_existing_model_is_replaced_only_with_overwrite_and_whole(tmp_path, small_corpus):
    lines = [str(small_corpus["lines"])]
    model = tmp_path / "tok.model"
    # a first model; loading the text also fills the datasets cache, so the CLI below writes only the model
    old = train_tokenizer(lines, model, vocab_size=400, max_chars=50_000).path.read_bytes()
    with pytest.raises(FileExistsError, match=f"model_path={model} already exists.*overwrite=true"):
        train_tokenizer(lines, model, vocab_size=420)
    assert model.read_bytes() == old
    # overwrite=true on a full disk: one line naming the file, the old model intact, no temporary file left
    cmd = [sys.executable, "-m", "data_pipeline", "train-tokenizer", f"inputs=[{lines[0]}]", f"model_path={model}",
           "vocab_size=420", "max_chars=50000", "overwrite=true"]
    r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit_file_size_to_2kb)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines() == [f"error: no space left on {tmp_path} while writing tok.model (File too large); "
                                     f"free some space or write elsewhere"], r.stderr
    assert model.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["tok.model"]
    new = train_tokenizer(lines, model, vocab_size=420, max_chars=50_000, overwrite=True)
    assert new.vocab_size == 420 and model.read_bytes() != old
