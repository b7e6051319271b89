"""Meta's Llama 3 `tokenizer.model` (tiktoken format: `base64(token) rank` per line) read from the local file and
turned, in memory, into the byte-level BPE of the `tokenizers` library that Hugging Face's tokenizer.json holds.

The file carries only the 128,000 ranked byte strings: the split pattern and the 256 special tokens are fixed by
Meta's tokenizer code, so they are written down here (Llama 3.1's names, which 3.2 and 3.3 keep; ids 128000-128255).
"""

import base64
import binascii
import re
from pathlib import Path

# The pre-tokenizer split of Llama 3 (that of OpenAI's cl100k): contractions, words, 1-3 digit groups,
# punctuation runs, newlines, other whitespace.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_BASE_TOKENS = 128_000  # ranked byte strings in the file; the special tokens follow them
_NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
          "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
          "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIAL_TOKENS = _NAMED + [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(_NAMED))]
LLAMA3_BOS, LLAMA3_EOS = "<|begin_of_text|>", "<|end_of_text|>"

_LINE = re.compile(rb"([A-Za-z0-9+/]+={0,2}) ([0-9]+)")


def looks_like_tiktoken(head: bytes) -> bool:
    """Whether a file's first bytes are text lines rather than a binary SentencePiece protobuf: a file that is text
    throughout its head is read as tiktoken, so that a damaged one is reported by its line."""
    return bool(head) and all(b in b"\t\n\r" or 32 <= b < 127 for b in head)


def _bad_line(path: Path, number: int, line: bytes, why: str) -> ValueError:
    shown = line[:40].decode("ascii", "replace") + ("..." if len(line) > 40 else "")
    return ValueError(f"{path}, line {number}: {why} in {shown!r}: a text file, but neither a valid tiktoken "
                      f"tokenizer.model (one `<base64 token> <rank>` per line) nor a SentencePiece model; "
                      f"download it again or pass the right tokenizer")


def read_ranks(path: Path) -> dict[bytes, int]:
    """{token bytes: rank} of a tiktoken BPE file, every line checked: ranks must be 0..n-1, each once."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        found = _LINE.fullmatch(line.strip())
        if not found:
            raise _bad_line(path, number, line, "not `<base64 token> <rank>`")
        try:
            token = base64.b64decode(found.group(1), validate=True)
        except binascii.Error:
            raise _bad_line(path, number, line, "bad base64") from None
        rank = int(found.group(2))
        if rank != len(ranks) or token in ranks:
            why = f"token already ranked {ranks[token]}" if token in ranks else f"rank {rank}, expected {len(ranks)}"
            raise _bad_line(path, number, line, why)
        ranks[token] = rank
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path}: {len(missing)} single bytes (first: {missing[0]}) have no rank, so some text "
                         f"cannot be encoded; not a byte-level BPE tokenizer.model")
    return ranks


def byte_to_char() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character (printable ASCII and Latin-1 stand for
    themselves, the rest are moved to 256 and up), the spelling tokenizer.json uses for byte strings."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merges that make BPE encode as tiktoken does. tiktoken repeatedly joins the adjacent pair whose
    concatenation has the lowest rank; so every split of a token into two ranked halves is a merge, and merges
    are ordered by the rank of what they make (ties by the halves' ranks)."""
    found = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                found.append((rank, ranks[left], ranks[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def tokenizer_from_ranks(ranks: dict[bytes, int], special_tokens: list[str] = LLAMA3_SPECIAL_TOKENS,
                         pattern: str = LLAMA3_PATTERN):
    """A `tokenizers.Tokenizer` that encodes as tiktoken does with these ranks: byte-level BPE that looks a
    whole piece up first (tiktoken does), the split pattern, then the special tokens at ids len(ranks)..."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    char = byte_to_char()
    spell = lambda token: "".join(char[b] for b in token)  # noqa: E731
    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = [(spell(a), spell(b)) for a, b in merges_from_ranks(ranks)]
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(special_tokens)  # ids follow the ranks, in this order
    return tok


def load_llama3(path: Path):
    """The backend of a Llama 3 tiktoken tokenizer.model, checked to have Llama 3's 128,000 ranks."""
    ranks = read_ranks(path)
    if len(ranks) != LLAMA3_BASE_TOKENS:
        raise ValueError(f"{path}: {len(ranks):,} ranked tokens, but Llama 3's tokenizer.model has "
                         f"{LLAMA3_BASE_TOKENS:,} (its special tokens and split pattern are not in the file, so only "
                         f"Llama 3's are supported); pass a tokenizer.json for other tiktoken vocabularies")
    return tokenizer_from_ranks(ranks)
