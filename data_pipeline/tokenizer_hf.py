"""Hugging Face tokenizers: a tokenizer.json (read by the `tokenizers` library) and the BOS/EOS tokens that the
tokenizer_config.json / special_tokens_map.json beside it name."""

import json
from pathlib import Path

CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def hf_files(tokenizer_json: Path) -> list[Path]:
    """tokenizer.json and the config files beside it that name its special tokens (those present)."""
    return [tokenizer_json] + [p for p in (tokenizer_json.parent / n for n in CONFIG_FILES) if p.is_file()]


def load_backend(path: Path):
    """The `tokenizers.Tokenizer` of a tokenizer.json, or one line saying the file is not one."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exceptions: not JSON, not a tokenizer, unknown model...
        why = " ".join(str(e).split())[:160]
        raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({why}); pass the tokenizer.json of a "
                         f"Hugging Face model folder (or the folder), a SentencePiece .model or Llama 3's "
                         f"tokenizer.model") from None


def _token_name(value) -> str | None:
    """A special token as configs write it: a string, or an AddedToken object with its text in "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def configured_specials(files: list[Path]) -> dict[str, dict[str, str]]:
    """{"bos_token": {config file name: token}, "eos_token": {...}}: what each config file says, so that a caller
    can tell none (no key anywhere) from ambiguous (files that disagree)."""
    found: dict[str, dict[str, str]] = {"bos_token": {}, "eos_token": {}}
    for path in files:
        if path.suffix != ".json" or path.name not in CONFIG_FILES:
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not JSON ({e}); restore the file from the model's release") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path}: not a JSON object; restore the file from the model's release")
        for key, names in found.items():
            name = _token_name(config.get(key))
            if name:
                names[path.name] = name
    return found
