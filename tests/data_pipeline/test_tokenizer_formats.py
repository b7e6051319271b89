"""Llama 3's tokenizer formats through the data pipeline: a tokenizer.json (Hugging Face) and Meta's tiktoken
tokenizer.model of the same BPE give the ids tiktoken's algorithm gives, the same shards through the real builder
entry point, content-hash identities, BOS/EOS from the configuration (never <|eot_id|>), one-line refusals."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import regex
from helpers import REPO, env
from llama3_artifacts import corpus_text, llama3_instruct, llama3_tokenizer

from data_pipeline.__main__ import main as data_pipeline_main
from data_pipeline.shard_format import HEADER_BYTES, read_header
from data_pipeline.shardset import ShardSet
from data_pipeline.tokenizer import Tokenizer

# Llama 3's split pattern and ids as Meta publishes them (its tokenizer.py), written out here, not imported
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BEGIN_OF_TEXT, END_OF_TEXT, EOT = 128000, 128001, 128009
# What trips byte-level BPE: accents, CJK, emoji, digit runs, contractions, runs of spaces and newlines, and text
# that spells special tokens (it must stay text: a document must never forge a separator)
TRICKY = ("naïve café — 東京 🙂\t tabs\n\n\n  12345678 don't WE'LL  \r\n x <|end_of_text|><|eot_id|> "
          "<|begin_of_text|>end")


def tiktoken_encode(ranks: dict[bytes, int], text: str) -> list[int]:
    """tiktoken's algorithm, written from its description: split by the pattern; a piece that is a token is
    that token, else repeatedly join the adjacent pair whose concatenation ranks lowest (leftmost on ties)."""
    ids = []
    for piece in regex.findall(LLAMA3_SPLIT, text):
        parts = [bytes([b]) for b in piece.encode()]
        if piece.encode() in ranks:
            parts = [piece.encode()]
        while len(parts) > 1:
            ranked = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
            if not ranked:
                break
            _, i = min(ranked)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[p] for p in parts]
    return ids


def read_ranks(path) -> dict[bytes, int]:
    import base64
    return {base64.b64decode(t): int(r) for t, r in (line.split() for line in path.read_text().splitlines())}


@pytest.fixture(scope="session")
def llama3(tmp_path_factory):
    return llama3_tokenizer(tmp_path_factory.getbasetemp() / "llama3_tokenizer")


@pytest.fixture(scope="module")
def toks(llama3):
    """The same BPE loaded from each format: {"hf": tokenizer.json folder, "tiktoken": original/tokenizer.model}."""
    return {"hf": Tokenizer(llama3 / "hf"), "tiktoken": Tokenizer(llama3 / "original" / "tokenizer.model")}


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    """A .jsonl of real paragraphs, the tricky text and a blank document (skipped by the builder)."""
    paragraphs = [p for p in corpus_text(60_000).split("\n\n") if p.strip()][:40]
    docs = paragraphs[:20] + [TRICKY, "   \n"] + paragraphs[20:]
    path = tmp_path_factory.mktemp("llama3_docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path, [d for d in docs if d.strip()]


@pytest.fixture(scope="module")
def built(llama3, documents, tmp_path_factory):
    """Shards of the documents from `python -m data_pipeline build`: tokenizer.json folder in a subprocess (2
    workers), the tiktoken file through the same main() in this process (1 worker)."""
    root = tmp_path_factory.mktemp("llama3_shards")
    args = [f"inputs=[{documents[0]}]", "val_fraction=0"]
    cmd = [sys.executable, "-m", "data_pipeline", "build", *args, f"out_dir={root / 'hf'}",
           f"tokenizer={llama3 / 'hf'}", "num_proc=2"]
    done = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert data_pipeline_main(["build", *args, f"out_dir={root / 'tiktoken'}", "num_proc=1",
                               f"tokenizer={llama3 / 'original' / 'tokenizer.model'}"]) == 0
    return root


def test_both_formats_encode_as_tiktoken_does(llama3, toks):
    ranks = read_ranks(llama3 / "original" / "tokenizer.model")
    texts = [corpus_text(30_000), TRICKY, "", " ", "\n\n"]
    for tok in toks.values():
        assert tok.vocab_size == 128256
        assert (tok.bos_id, tok.eos_id, tok.token_to_id("<|eot_id|>")) == (BEGIN_OF_TEXT, END_OF_TEXT, EOT)
        assert tok.id_to_token(BEGIN_OF_TEXT) == "<|begin_of_text|>" and tok.id_to_token(128255) is not None
        for text in texts:
            ids = tok.encode(text)
            assert ids == tiktoken_encode(ranks, text)
            assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text  # byte-level: exact; markers dropped
        assert tok.encode_batch(texts) == tok.encode_batch(texts, num_threads=2) == [tok.encode(t) for t in texts]
    assert toks["hf"].format == "huggingface" and toks["tiktoken"].format == "tiktoken"
    assert type(toks["hf"].backend).__module__.startswith("tokenizers")


def test_bits_per_byte_count_the_texts_own_utf8_bytes_in_each_format(llama3, toks):
    """Byte-level BPE (tokenizer.json, tiktoken): Tokenizer.token_bytes gives each id the length of the bytes Meta's
    rank file says it stands for (special tokens 0, no dummy prefix), and validation's byte count of the labels
    (train/loop/validation.py label_bytes) is the UTF-8 length of the text they encode, a leading space and characters
    split across tokens included; ignored labels count their tokens' bytes out."""
    from train.loop.validation import label_bytes

    token_of = {i: b for b, i in read_ranks(llama3 / "original" / "tokenizer.model").items()}
    for name, tok in toks.items():
        table, dummy_prefix = tok.token_bytes()
        assert not dummy_prefix, name
        assert [int(table[i]) for i in sorted(token_of)] == [len(token_of[i]) for i in sorted(token_of)], name
        assert not table[len(token_of):].any(), name  # the special tokens stand for no text
        for text in (TRICKY, " leading space", "日本語 🙂 — ü"):
            ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
            inputs, labels = np.array([ids[:-1]]), np.array([ids[1:]])
            assert label_bytes(inputs, labels, table, dummy_prefix, tok.bos_id) == len(text.encode("utf-8")), name
            labels[0, :2] = -100  # the first two tokens (parts of one character in the last text) are not counted
            skipped = len(token_of[ids[1]] + token_of[ids[2]])
            assert label_bytes(inputs, labels, table, dummy_prefix, tok.bos_id) == len(text.encode("utf-8")) - skipped


def test_builder_gives_the_same_uint32_shards_from_each_format(built, documents, toks, llama3):
    ranks = read_ranks(llama3 / "original" / "tokenizer.model")
    expected = np.concatenate([[BEGIN_OF_TEXT, *tiktoken_encode(ranks, d), END_OF_TEXT] for d in documents[1]])
    for name, tok in toks.items():
        manifest = json.loads((built / name / "manifest.json").read_text())
        assert manifest["dtype"] == "uint32" and manifest["tokenizer"]["vocab_size"] == 128256
        assert manifest["tokenizer"]["sha256"] == tok.sha256 and manifest["tokenizer"]["format"] == tok.format
        shard = built / name / manifest["splits"]["train"]["shards"][0]["file"]
        assert read_header(shard)["dtype"] == np.dtype("<u4")
        tokens = np.fromfile(shard, dtype="<u4", offset=HEADER_BYTES)
        np.testing.assert_array_equal(tokens, expected)
        assert ShardSet.open(built / name, expect_tokenizer_sha256=tok.sha256).n_documents == len(documents[1])
    shard = "train/000000.bin"
    assert (built / "hf" / shard).read_bytes() == (built / "tiktoken" / shard).read_bytes()


def test_identity_is_a_hash_of_the_content(llama3, toks, built, tmp_path):
    hf, tiktoken = toks["hf"], toks["tiktoken"]
    shutil.copytree(llama3 / "hf", tmp_path / "elsewhere")
    shutil.copy(llama3 / "original" / "tokenizer.model", tmp_path / "tokenizer.model")
    assert Tokenizer(tmp_path / "elsewhere").sha256 == hf.sha256  # a copy elsewhere: same identity
    assert Tokenizer(tmp_path / "elsewhere" / "tokenizer.json").sha256 == hf.sha256  # the file or its folder
    assert Tokenizer(tmp_path / "tokenizer.model").sha256 == tiktoken.sha256 != hf.sha256
    assert ShardSet.open(built / "hf", expect_tokenizer_sha256=Tokenizer(tmp_path / "elsewhere").sha256)

    config = tmp_path / "elsewhere" / "tokenizer_config.json"  # a file that defines it changes: another identity
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 8192}))
    changed = Tokenizer(tmp_path / "elsewhere").sha256
    assert changed != hf.sha256
    with pytest.raises(ValueError, match="rebuild the shards"):
        ShardSet.open(built / "hf", expect_tokenizer_sha256=changed)
    lines = (tmp_path / "tokenizer.model").read_text().splitlines()
    lines[-1] = f"{'/' * 8} {len(lines) - 1}"  # another byte string at the last rank: still a valid file
    (tmp_path / "tokenizer.model").write_text("\n".join(lines) + "\n")
    assert Tokenizer(tmp_path / "tokenizer.model").sha256 != tiktoken.sha256


def test_document_markers_come_from_the_configuration(llama3, tmp_path):
    with pytest.raises(ValueError, match=r"<\|eot_id\|>.*pass \"data\.eos_token='<\|end_of_text\|>'\""):
        Tokenizer(llama3_instruct(llama3, tmp_path / "instruct"))
    assert Tokenizer(tmp_path / "instruct", eos_token="<|end_of_text|>").eos_id == END_OF_TEXT
    with pytest.raises(ValueError, match=r"eot_id.*data\.eos_token="):  # even when asked for explicitly
        Tokenizer(tmp_path / "instruct", eos_token="<|eot_id|>")

    (tmp_path / "bare").mkdir()  # a tokenizer.json with no config: nothing names the markers
    shutil.copy(llama3 / "hf" / "tokenizer.json", tmp_path / "bare")
    with pytest.raises(ValueError, match=r"names no bos_token.*data\.bos_token="):
        Tokenizer(tmp_path / "bare")
    bare = Tokenizer(tmp_path / "bare", "<|begin_of_text|>", "<|end_of_text|>")
    assert (bare.bos_id, bare.eos_id) == (BEGIN_OF_TEXT, END_OF_TEXT)

    # two config files that disagree: ambiguous, refused naming the key
    (tmp_path / "instruct" / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    with pytest.raises(ValueError, match=r"ambiguous eos_token.*data\.eos_token="):
        Tokenizer(tmp_path / "instruct")
    with pytest.raises(ValueError, match=r"data\.bos_token=<\|nope\|> is not a token"):
        Tokenizer(llama3 / "hf", bos_token="<|nope|>")
    with pytest.raises(ValueError, match="both <.end_of_text.>"):
        Tokenizer(llama3 / "hf", bos_token="<|end_of_text|>")


def _bad_build(capsys, tmp_path, documents, tokenizer, *extra) -> str:
    """One builder run that must fail: exit 1, one `error:` line naming the problem, nothing written."""
    out = tmp_path / "out"
    code = data_pipeline_main(["build", f"inputs=[{documents[0]}]", f"out_dir={out}", f"tokenizer={tokenizer}",
                               "num_proc=1", *extra])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.glob(".out*")), "a failed build wrote something"
    return err


def test_bad_tokenizers_are_one_line_errors_and_write_nothing(llama3, documents, tmp_path, capsys):
    lines = (llama3 / "original" / "tokenizer.model").read_text().splitlines()
    lines[499] = "IQ==#"  # a damaged line (line 500)
    corrupt = tmp_path / "corrupt.model"
    corrupt.write_text("\n".join(lines) + "\n")
    err = _bad_build(capsys, tmp_path, documents, corrupt)
    assert "corrupt.model, line 500" in err and "download it again" in err

    not_tokenizer = tmp_path / "tokenizer.json"
    not_tokenizer.write_text(json.dumps({"version": "1.0", "model": {"type": "Nothing"}}))
    assert "tokenizer.json: not a Hugging Face tokenizer.json" in _bad_build(capsys, tmp_path, documents, not_tokenizer)

    err = _bad_build(capsys, tmp_path, documents, llama3 / "hf", "bos_token='<|nope|>'")
    assert "bos_token=<|nope|> is not a token" in err and "data." not in err  # the builder's own key
    err = _bad_build(capsys, tmp_path, documents, llama3_instruct(llama3, tmp_path / "instruct"))
    assert "pass \"eos_token='<|end_of_text|>'\"" in err and "data." not in err


def test_training_refuses_shards_whose_markers_differ(llama3, documents, tmp_path):
    from train.loop.data import check_markers

    out = tmp_path / "other_eos"
    assert data_pipeline_main(["build", f"inputs=[{documents[0]}]", f"out_dir={out}", f"tokenizer={llama3 / 'hf'}",
                               "num_proc=1", "eos_token='<|reserved_special_token_0|>'"]) == 0
    shards = ShardSet.open(out, verify=False)
    assert shards.eos_id == 128002
    check_markers(Tokenizer(llama3 / "hf", eos_token="<|reserved_special_token_0|>"), [shards])
    with pytest.raises(ValueError, match=r"data\.eos_token='<\|reserved_special_token_0\|>'"):
        check_markers(Tokenizer(llama3 / "hf"), [shards])
