"""Builder: text -> shards -> loader -> text round trip, split, layouts, parallel determinism, atomic restart."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from tqdm import tqdm

from data_pipeline.build import build_shards
from data_pipeline.loader import ShardSet, validation_batches
from data_pipeline.shard_format import HEADER_BYTES, MAGIC, dtype_for_vocab, read_header, write_shard


def source_documents(small_corpus) -> list[str]:
    """The documents as plain Python reads them: whole .txt files (sorted), then jsonl records."""
    docs = [p.read_text(encoding="utf-8") for p in sorted(small_corpus["works"].glob("*.txt"))]
    docs += [json.loads(line)["text"] for line in small_corpus["jsonl"].read_text(encoding="utf-8").splitlines()]
    return docs


def split_documents(shardset: ShardSet, tokenizer) -> list[str]:
    """Every document of a split, decoded from its BOS ... EOS span of the token stream."""
    stream = np.empty(shardset.n_tokens, dtype=np.int64)
    shardset.read(0, stream)
    bos = np.flatnonzero(stream == tokenizer.bos_id)
    eos = np.flatnonzero(stream == tokenizer.eos_id)
    assert len(bos) == len(eos) == shardset.n_documents and np.all(bos < eos) and np.all(eos[:-1] < bos[1:])
    return [tokenizer.decode(stream[b + 1:e]) for b, e in zip(bos, eos)]


def is_subsequence(part, whole) -> bool:
    it = iter(whole)
    return all(any(x == y for y in it) for x in part)


def test_round_trip_text_to_shards_to_text(shards, small_corpus, tokenizer):
    source = source_documents(small_corpus)
    train = split_documents(ShardSet.open(shards, "train"), tokenizer)
    val = split_documents(ShardSet.open(shards, "val"), tokenizer)
    assert sorted(train + val) == sorted(source)  # nothing lost, changed or duplicated
    assert is_subsequence(train, source) and is_subsequence(val, source)  # input order kept
    assert len(val) == round(0.1 * len(source))


def test_loader_batches_decode_to_the_source_text(shards, small_corpus, tokenizer):
    val = ShardSet.open(shards, "val")
    seq_len = 128
    ids = [i for b in validation_batches(val, seq_len, batch_size=4) for i in b["input_ids"].flatten().tolist()]
    assert len(ids) == val.n_windows(seq_len) // 4 * 4 * seq_len > 0
    text = tokenizer.decode(ids[:-8])  # the last few ids may end inside a multi-byte character
    assert text == "".join(split_documents(val, tokenizer))[:len(text)]


def test_manifest_records_shards_tokenizer_sources_and_split(shards, tokenizer, small_corpus):
    m = json.loads((shards / "manifest.json").read_text())
    assert m["tokenizer"]["sha256"] == tokenizer.sha256 and m["dtype"] == "uint16"
    assert {os.path.basename(s["path"]) for s in m["sources"]} >= {"scenes.jsonl"}
    for split, info in m["splits"].items():
        assert sum(s["tokens"] for s in info["shards"]) == info["tokens"]
        for s in info["shards"][:-1]:
            assert s["tokens"] == m["settings"]["shard_tokens"]  # fixed token budget, last one shorter
        for s in info["shards"]:
            header = read_header(shards / s["file"])
            assert header["tokens"] == s["tokens"] and header["vocab_size"] == tokenizer.vocab_size
            assert (shards / s["file"]).read_bytes()[:8] == MAGIC


def test_split_is_deterministic_and_seeded(tmp_path, small_corpus, tokenizer):
    def val_docs(out, seed):
        build_shards([str(small_corpus["jsonl"])], out, tokenizer, val_docs=5, seed=seed, num_proc=1, progress=False)
        return split_documents(ShardSet.open(out, "val"), tokenizer)
    a, b, c = val_docs(tmp_path / "a", 0), val_docs(tmp_path / "b", 0), val_docs(tmp_path / "c", 1)
    assert a == b and len(a) == 5 and a != c


def test_two_processes_write_the_same_shards_as_one(tmp_path, small_corpus, tokenizer):
    inputs = [str(small_corpus["works"]), str(small_corpus["jsonl"])]
    one = build_shards(inputs, tmp_path / "one", tokenizer, val_fraction=0.1, shard_tokens=40_000, num_proc=1,
                       progress=False)
    started = time.time()
    two = build_shards(inputs, tmp_path / "two", tokenizer, val_fraction=0.1, shard_tokens=40_000, num_proc=2,
                       progress=False)
    took = time.time() - started
    m1, m2 = json.loads(one.read_text()), json.loads(two.read_text())
    assert m1["splits"] == m2["splits"]  # same files, counts and checksums
    # The time the summary prints ("30.1 MB in 51.0s") is the build's: loading, the workers' start and the first
    # chunk (in flight before any result comes back) included; what is left out is hashing the inputs.
    assert 0.8 * took <= m2["build_seconds"] <= took, (m2["build_seconds"], took)


def test_line_and_paragraph_modes(tmp_path, small_corpus, tokenizer):
    lines = [ln for ln in small_corpus["lines"].read_text(encoding="utf-8").splitlines()]
    build_shards([str(small_corpus["lines"])], tmp_path / "l", tokenizer, txt_mode="line", num_proc=1, progress=False)
    assert split_documents(ShardSet.open(tmp_path / "l"), tokenizer) == lines
    text = small_corpus["works"].glob("*.txt").__next__().read_text(encoding="utf-8")
    (tmp_path / "p.txt").write_text(text, encoding="utf-8")
    build_shards([str(tmp_path / "p.txt")], tmp_path / "p", tokenizer, txt_mode="paragraph", num_proc=1,
                 progress=False)
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    assert split_documents(ShardSet.open(tmp_path / "p"), tokenizer) == paragraphs


@pytest.mark.parametrize("layout", ["sotu.jsonl", "shakespeare", "moby_dick.txt"])
def test_shared_corpus_layouts(tmp_path, shared_corpora, tokenizer, layout):
    mode = "line" if layout == "moby_dick.txt" else "file"
    path = build_shards([str(shared_corpora / layout)], tmp_path / "out", tokenizer, txt_mode=mode,
                        val_fraction=0.05, num_proc=2, progress=False)
    m = json.loads(path.read_text())
    expected_docs = {"sotu.jsonl": 233, "shakespeare": 42, "moby_dick.txt": None}[layout]
    built = m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"]
    if expected_docs:
        assert built == expected_docs
    else:  # one paragraph per non-blank line
        text = (shared_corpora / layout).read_text(encoding="utf-8")
        assert built == sum(1 for ln in text.splitlines() if ln.strip())
    assert m["splits"]["val"]["documents"] >= 1 and m["splits"]["train"]["tokens"] > 100_000


def test_rerun_is_a_no_op_and_other_settings_need_overwrite(tmp_path, small_corpus, tokenizer):
    out = tmp_path / "out"
    first = build_shards([str(small_corpus["jsonl"])], out, tokenizer, num_proc=1, progress=False)
    stamp = first.stat().st_mtime_ns
    assert build_shards([str(small_corpus["jsonl"])], out, tokenizer, num_proc=1, progress=False) == first
    assert first.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="overwrite"):
        build_shards([str(small_corpus["jsonl"])], out, tokenizer, val_docs=3, num_proc=1, progress=False)
    build_shards([str(small_corpus["jsonl"])], out, tokenizer, val_docs=3, num_proc=1, overwrite=True,
                 progress=False)
    assert json.loads(first.read_text())["splits"]["val"]["documents"] == 3


def test_killed_build_leaves_nothing_complete_and_rerun_finishes(tmp_path, small_corpus, tokenizer):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_pipeline", "build", f"inputs=[{small_corpus['works']}]", f"out_dir={out}",
           f"tokenizer={tokenizer.path}", "shard_tokens=5000", "num_proc=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / ".out.partial"  # the build's parts (data_pipeline/parts.py) and merged set are in here
    deadline = time.time() + 60
    while not list(partial.glob("**/train/000000.bin")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "build finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="manifest"):
        ShardSet.open(out)
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert ShardSet.open(out).n_documents == len(list(small_corpus["works"].glob("*.txt")))
    assert not (tmp_path / ".out.partial").exists()


def test_uint32_shards_for_large_vocabularies(tmp_path):
    assert dtype_for_vocab(65536) == np.uint16 and dtype_for_vocab(65537) == np.uint32
    ids = np.array([0, 70_000, 131_071, 5], dtype=np.int64)
    entry = write_shard(tmp_path / "s.bin", ids, vocab_size=131_072)
    header = read_header(tmp_path / "s.bin")
    assert header["dtype"] == np.uint32 and header["tokens"] == 4 and entry["bytes"] == HEADER_BYTES + 16
    assert np.array_equal(np.fromfile(tmp_path / "s.bin", dtype=np.uint32, offset=HEADER_BYTES), ids)


def snapshot(root) -> dict:
    """Every file under root and its bytes: what a refused build must leave exactly as it was."""
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_overwrite_replaces_only_a_previous_shard_set(tmp_path, small_corpus, tokenizer, shards):
    work = tmp_path / "W"  # the layout: inputs and tokenizer inside the folder given as out_dir
    (work / "raw").mkdir(parents=True)
    shutil.copy(small_corpus["lines"], work / "raw" / "lines.txt")
    shutil.copy(tokenizer.path, work / "tok.model")
    before = snapshot(tmp_path)

    def refused(inputs, out_dir, tok, match):
        with pytest.raises(ValueError, match=match):
            build_shards(inputs, out_dir, tok, txt_mode="line", num_proc=1, overwrite=True, progress=False)
        after = snapshot(tmp_path)
        assert {f: after.get(f) for f in before} == before  # nothing that was there changed or went
        assert not [f for f in after if f not in before and not f.endswith(".lock")]  # nothing half-built

    refused([str(work / "raw")], work, work / "tok.model", f"out_dir={work} contains the build's input")
    refused([str(work / "raw")], work / "raw" / "shards", tokenizer, "lies inside the build's input")
    refused([str(work / "raw" / "lines.txt")], work / "raw" / "lines.txt", tokenizer, "is the build's input")
    refused([str(small_corpus["lines"])], work, work / "tok.model", "contains the build's tokenizer")
    assert not (work / "raw" / "shards").exists()

    notes = tmp_path / "notes"  # a folder of someone's files, not a shard set
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me\n")
    before = snapshot(tmp_path)
    refused([str(small_corpus["lines"])], notes, tokenizer, f"out_dir={notes}: .*no manifest.json")

    old = tmp_path / "set"  # a previous shard set that someone added a file to
    shutil.copytree(shards, old)
    (old / "train" / "README.md").write_text("which corpus this is\n")
    before = snapshot(tmp_path)
    refused([str(small_corpus["lines"])], old, tokenizer, "train/README.md, which a build does not write")
    (old / "train" / "README.md").unlink()  # a shard set and nothing else: overwrite=true replaces it
    build_shards([str(small_corpus["lines"])], old, tokenizer, txt_mode="line", num_proc=1, overwrite=True,
                 progress=False)
    assert ShardSet.open(old).n_documents == sum(1 for ln in small_corpus["lines"].read_text().splitlines()
                                                 if ln.strip())


def test_progress_without_a_terminal_is_log_lines(tmp_path, small_corpus, tokenizer, monkeypatch, caplog, capsys):
    """Under pytest stderr is no terminal (as under SLURM or a pipe): no bar, but a line per LOG_EVERY_S (0
    here: one per chunk) with MB done of the total, documents and rates, and one at the end."""
    from data_pipeline import progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="data_pipeline")
    build_shards([str(small_corpus["lines"])], tmp_path / "set", tokenizer, txt_mode="line", num_proc=1)
    text_bytes = json.loads((tmp_path / "set" / "manifest.json").read_text())["input_bytes"]
    periodic = [line for line in caplog.messages if " left" in line]
    assert len(periodic) >= 4, caplog.messages  # one per chunk: at least 4 chunks for one worker
    for line in periodic:
        assert line.startswith("tokenizing: ") and " of " in line and "B/s" in line and " documents" in line, line
    assert f" of {tqdm.format_sizeof(text_bytes, 'B')} (" in periodic[0], (text_bytes, periodic[0])
    assert caplog.messages[-1].startswith("tokenizing: ") and " in " in caplog.messages[-1], caplog.messages
    assert "it/s" not in capsys.readouterr().err  # no tqdm bar was drawn
