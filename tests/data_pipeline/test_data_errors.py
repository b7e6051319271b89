"""Bad input: a one-line error naming the file and the fix, exit code 1 from the CLI, nothing that looks complete."""

import hashlib
import json
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline.build import build_shards
from data_pipeline.loader import ShardSet, TokenLoader
from data_pipeline.shard_format import HEADER_BYTES


def cli(*args):
    return subprocess.run([sys.executable, "-m", "data_pipeline", *map(str, args)], capture_output=True, text=True)


def assert_one_line_error(result, *needles):
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert str(needle) in lines[0]


@pytest.fixture
def copy_of_shards(shards, tmp_path):
    """A private copy of the session shard set, safe to corrupt."""
    out = tmp_path / "set"
    shutil.copytree(shards, out)
    return out


def first_shard(root):
    return root / json.loads((root / "manifest.json").read_text())["splits"]["train"]["shards"][0]["file"]


# --- builder inputs ---------------------------------------------------------------------------------------

def test_missing_input(tmp_path, tokenizer):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        build_shards([str(missing)], tmp_path / "out", tokenizer, progress=False)
    assert_one_line_error(cli("build", f"inputs=[{missing}]", f"out_dir={tmp_path / 'out'}",
                              f"tokenizer={tokenizer.path}"), missing)
    assert not (tmp_path / "out").exists()


def test_empty_input(tmp_path, tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt.*empty"):
        build_shards([str(empty)], tmp_path / "out", tokenizer, progress=False)
    assert_one_line_error(cli("build", f"inputs=[{empty}]", f"out_dir={tmp_path / 'out'}",
                              f"tokenizer={tokenizer.path}"), empty)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n")  # not empty on disk, but no document worth a token
    with pytest.raises(ValueError, match="blank"):
        build_shards([str(blank)], tmp_path / "out", tokenizer, txt_mode="line", num_proc=1, progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_records_without_the_text_field(tmp_path, tokenizer, small_corpus):
    good = small_corpus["jsonl"].read_text().splitlines()[:5]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(good + [json.dumps({"id": 99, "body": "no text here"})]) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl.*'text'"):
        build_shards([str(small_corpus["jsonl"]), str(bad)], tmp_path / "out", tokenizer, progress=False)
    assert_one_line_error(cli("build", f"inputs=[{bad}]", f"out_dir={tmp_path / 'out'}",
                              f"tokenizer={tokenizer.path}", "text_field=body"), "bad.jsonl", "body")
    assert not (tmp_path / "out").exists()


def test_parquet_records_whose_text_is_null_are_named_as_such(tmp_path, tokenizer):
    """A parquet file that has the field, but null in a record: said so (how many, which), not "without the field"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["A first document.", None, "A third one.", None]}), bad)
    result = cli("build", f"inputs=[{bad}]", f"out_dir={tmp_path / 'out'}", f"tokenizer={tokenizer.path}")
    assert_one_line_error(result, f"{bad}: 2 of 4 records have a null 'text' (the first: record 2); give them text "
                                  f"or remove them")
    assert not (tmp_path / "out").exists()


def test_hub_name_offline_fails_fast(tmp_path, tokenizer):
    result = cli("build", "inputs=[hf:roneneldan/TinyStories]", f"out_dir={tmp_path / 'out'}",
                 f"tokenizer={tokenizer.path}")
    assert_one_line_error(result, "offline" if "offline" in result.stderr else "HF_HUB_OFFLINE")


def test_misspelt_config_key(tmp_path, tokenizer, small_corpus):
    assert_one_line_error(cli("build", f"inputs=[{small_corpus['jsonl']}]", f"out_dri={tmp_path}",
                              f"tokenizer={tokenizer.path}"), "out_dri")


# --- shards -----------------------------------------------------------------------------------------------

def test_truncated_shard(copy_of_shards):
    shard = first_shard(copy_of_shards)
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(ValueError, match=f"{shard.name}.*truncated"):
        ShardSet.open(copy_of_shards, verify=False)  # caught even by the cheap check
    assert_one_line_error(cli("verify", f"out_dir={copy_of_shards}"), shard)


def test_size_disagrees_with_manifest(copy_of_shards):
    manifest = copy_of_shards / "manifest.json"
    m = json.loads(manifest.read_text())
    m["splits"]["train"]["shards"][0]["tokens"] += 1  # the manifest adds up (entry, bytes, total) ...
    m["splits"]["train"]["shards"][0]["bytes"] += 2
    m["splits"]["train"]["tokens"] += 1
    manifest.write_text(json.dumps(m))
    with pytest.raises(ValueError, match="000000.bin.*disagree"):  # ... but not with the shard's header
        ShardSet.open(copy_of_shards, verify=False)


def test_checksum_disagrees_with_manifest(copy_of_shards):
    shard = first_shard(copy_of_shards)
    data = bytearray(shard.read_bytes())
    data[HEADER_BYTES + 100], data[HEADER_BYTES + 102] = data[HEADER_BYTES + 102], data[HEADER_BYTES + 100]
    data[HEADER_BYTES + 101], data[HEADER_BYTES + 103] = data[HEADER_BYTES + 103], data[HEADER_BYTES + 101]
    assert bytes(data) != shard.read_bytes(), "swap changed nothing: pick other positions"
    shard.write_bytes(bytes(data))  # same size, same ids, different order: only the checksum can tell
    with pytest.raises(ValueError, match=f"{shard.name}.*checksum"):
        ShardSet.open(copy_of_shards)
    assert_one_line_error(cli("verify", f"out_dir={copy_of_shards}"), shard, "checksum")


@pytest.mark.parametrize("field,value,message", [("magic", b"NOTTOKS\x00", "magic"), ("version", 99, "version")])
def test_wrong_magic_or_version(copy_of_shards, field, value, message):
    shard = first_shard(copy_of_shards)
    data = bytearray(shard.read_bytes())
    if field == "magic":
        data[:8] = value
    else:
        data[8:12] = struct.pack("<I", value)
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{shard.name}.*{message}"):
        ShardSet.open(copy_of_shards, verify=False)


def test_token_ids_beyond_the_vocabulary(copy_of_shards, tokenizer):
    shard = first_shard(copy_of_shards)
    tokens = np.fromfile(shard, dtype=np.uint16, offset=HEADER_BYTES)
    tokens[:] = tokenizer.vocab_size + 7  # every window of this shard is out of range
    with open(shard, "r+b") as f:
        f.seek(HEADER_BYTES)
        f.write(tokens.tobytes())
    with pytest.raises(ValueError, match=f"{shard.name}.*{tokenizer.vocab_size + 7} >= vocab size"):
        ShardSet.open(copy_of_shards)
    # also when the manifest's checksum agrees (a shard written wrongly, not damaged later)
    manifest = copy_of_shards / "manifest.json"
    m = json.loads(manifest.read_text())
    m["splits"]["train"]["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    manifest.write_text(json.dumps(m))
    with pytest.raises(ValueError, match=f"{shard.name}.*{tokenizer.vocab_size + 7} >= vocab size"):
        ShardSet.open(copy_of_shards)
    # without the checksum pass the loader still refuses them, before a batch leaves it
    loader = TokenLoader(ShardSet.open(copy_of_shards, verify=False), seq_len=16, global_batch_size=2, seed=0)
    with pytest.raises(ValueError, match="vocab size"):
        for _ in range(len(tokens) // 16 * 4):
            next(loader)


def test_tokenizer_hash_differs(shards, tokenizer, tmp_path, small_corpus):
    from data_pipeline.tokenizer import train_tokenizer
    other = train_tokenizer([str(small_corpus["lines"])], tmp_path / "other.model", vocab_size=400)
    with pytest.raises(ValueError, match="manifest.json.*tokenizer"):
        ShardSet.open(shards, expect_tokenizer_sha256=other.sha256)
    assert_one_line_error(cli("verify", f"out_dir={shards}", f"tokenizer={other.path}"), "manifest.json")
    ShardSet.open(shards, expect_tokenizer_sha256=tokenizer.sha256)  # the right one passes


def test_seq_len_longer_than_the_shard_set(shards):
    val = ShardSet.open(shards, "val")
    with pytest.raises(ValueError, match="seq_len"):
        TokenLoader(val, seq_len=val.n_tokens, global_batch_size=1, seed=0)
    TokenLoader(val, seq_len=val.n_tokens - 1, global_batch_size=1, seed=0)  # one window still fits


def test_missing_manifest_means_incomplete(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest"):
        ShardSet.open(tmp_path)


def test_text_that_is_not_utf8_is_named_with_its_byte(tmp_path, tokenizer, small_corpus):
    good = small_corpus["lines"].read_bytes()[:3000]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(good + b"caf\xe9 au lait\n" + good)  # Latin-1 bytes in a UTF-8 file
    offset = len(good) + len(b"caf")
    with pytest.raises(ValueError, match=f"bad.txt: not UTF-8 text \\(byte {offset}: .*encoding_errors=replace"):
        build_shards([str(small_corpus["lines"]), str(bad)], tmp_path / "out", tokenizer, num_proc=1, progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()
    binary = tmp_path / "image.txt"
    binary.write_bytes(bytes(range(256)))  # bytes 0-127 are ASCII; 128 cannot start a character
    with pytest.raises(ValueError, match="image.txt: not UTF-8 text \\(byte 128: invalid start byte"):
        build_shards([str(binary)], tmp_path / "out", tokenizer, num_proc=1, progress=False)
    # encoding_errors=replace: each bad byte becomes U+FFFD, the rest of the file is kept as it was
    build_shards([str(bad)], tmp_path / "out", tokenizer, num_proc=1, progress=False, encoding_errors="replace")
    split = ShardSet.open(tmp_path / "out")
    stream = np.empty(split.n_tokens, dtype=np.int64)
    split.read(0, stream)
    assert tokenizer.decode(stream) == bad.read_bytes().decode("utf-8", errors="replace")


def edited(root, split: str, key: str, change: int):
    """The shard set's manifest with splits.<split>.<key> changed by `change` (as a careless edit would)."""
    manifest = root / "manifest.json"
    m = json.loads(manifest.read_text())
    m["splits"][split][key] += change
    manifest.write_text(json.dumps(m))
    return manifest


@pytest.mark.parametrize("change", [1000, -1000])
def test_split_total_disagreeing_with_the_shards(copy_of_shards, shards, change):
    held = ShardSet.open(shards).n_tokens
    manifest = edited(copy_of_shards, "train", "tokens", change)  # raised: reads past the end; lowered: data left out
    with pytest.raises(ValueError, match=f"{manifest}: splits.train.tokens is {held + change:,} but its shards "
                                         f"\\(\\d+\\) hold {held:,}"):
        ShardSet.open(copy_of_shards, verify=False)  # the cheap check on open already refuses it
    if change > 0:  # and `verify`, which said ok
        assert_one_line_error(cli("verify", f"out_dir={copy_of_shards}"), manifest, "splits.train.tokens")


def test_document_count_disagreeing_with_the_shards(copy_of_shards, shards):
    documents = ShardSet.open(shards, "val").n_documents
    manifest = edited(copy_of_shards, "val", "documents", 1)
    ShardSet.open(copy_of_shards, "val", verify=False)  # counting documents takes the full pass ...
    with pytest.raises(ValueError, match=f"{manifest}: splits.val.documents is {documents + 1:,} but its shards hold "
                                         f"{documents:,} documents"):
        ShardSet.open(copy_of_shards, "val")  # ... which verify (and `python -m data_pipeline verify`) makes


def test_one_book_with_a_validation_split_suggests_a_txt_mode_that_works(tmp_path, tokenizer, sample_corpus, capsys):
    """One .txt file is one document (txt_mode=file): a validation split leaves none to train on. The one line
    says so and names txt_mode=paragraph, which then builds; one JSON record is not told about txt_mode."""
    from data_pipeline.__main__ import main

    book = sorted(sample_corpus.glob("*.txt"))[0]
    args = ["build", f"inputs=[{book}]", f"out_dir={tmp_path / 'set'}", f"tokenizer={tokenizer.path}",
            "val_fraction=0.1", "num_proc=1"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "leaves no training documents out of 1" in err, err
    assert "txt_mode=paragraph (or line)" in err, err
    assert not (tmp_path / "set").exists()
    assert main([*args, "txt_mode=paragraph"]) == 0
    assert json.loads((tmp_path / "set" / "manifest.json").read_text())["splits"]["val"]["documents"] > 0
    record = tmp_path / "one.jsonl"
    record.write_text(json.dumps({"text": "one record"}) + "\n")
    with pytest.raises(ValueError, match="out of 1; lower val_fraction") as refused:
        build_shards([str(record)], tmp_path / "set2", tokenizer, val_fraction=0.1, progress=False)
    assert "txt_mode" not in str(refused.value)


@pytest.mark.parametrize("command", ["train-tokenizer", "build", "verify"])
def test_help_says_what_every_key_does(command, capsys):
    """`python -m data_pipeline COMMAND --help` (its main, here): a line per key with its default and a
    description, the text of the key's comment in data_pipeline/config.py."""
    from dataclasses import fields

    from data_pipeline.__main__ import main
    from data_pipeline.config import COMMANDS

    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    for field in fields(COMMANDS[command]):
        line = next((line for line in out.splitlines() if line.startswith(f"  {field.name}=")), None)
        assert line is not None, (field.name, out)
        default, _, description = line.strip().partition("  ")
        assert len(description.strip()) > 10, (field.name, line)
