"""Structured (Hydra) configs of the data commands: a misspelt key fails with the key's name."""

from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TrainTokenizerConfig:
    inputs: list[str] = MISSING  # files, directories, globs or hf:owner/name
    model_path: str = MISSING  # where the .model file goes
    vocab_size: int = 8192
    text_field: str = "text"  # .jsonl/.json/.parquet field holding the text
    txt_mode: str = "file"  # .txt documents: file | line | paragraph
    max_chars: int = 200_000_000  # train on a seeded sample of at most this much text
    seed: int = 0
    encoding_errors: str = "strict"  # .txt inputs with invalid UTF-8: strict (fail naming the byte) | replace
    overwrite: bool = False  # replace an existing model_path


@dataclass
class BuildConfig:
    inputs: list[str] = MISSING
    out_dir: str = MISSING
    # a SentencePiece .model, a tokenizer.json or a Hugging Face folder holding one, or Llama 3's tiktoken
    # tokenizer.model (detected from the file)
    tokenizer: str = MISSING
    bos_token: str = ""  # the token that starts each document; "" = the one the tokenizer's configuration names
    eos_token: str = ""  # the token that ends each document (never <|eot_id|>); "" = the configured one
    text_field: str = "text"
    txt_mode: str = "file"
    val_fraction: float = 0.0  # share of documents held out for validation ...
    val_docs: int = 0  # ... or a count of them
    shard_tokens: int = 1 << 27
    num_proc: Optional[int] = None  # None: all cores
    seed: int = 0  # decides the train/val split
    encoding_errors: str = "strict"  # .txt inputs with invalid UTF-8: strict (fail naming the byte) | replace
    overwrite: bool = False  # replace a previous shard set in out_dir (never anything else)
    # one task of a SLURM array (launch/slurm/build_shards.sbatch): build only part `part` (0-based) of `parts`;
    # the task that finds all parts built merges them. parts=N without part: merge the N parts, build none
    parts: Optional[int] = None
    part: Optional[int] = None
    # one machine: input text per part, the most work a crash or Ctrl-C loses (a rerun skips the parts built)
    part_bytes: int = 1 << 30


@dataclass
class VerifyConfig:
    out_dir: str = MISSING
    tokenizer: Optional[str] = None  # also check the shards were built with this tokenizer (file or folder)
    bos_token: str = ""  # as the build was given them
    eos_token: str = ""


COMMANDS = {"train-tokenizer": TrainTokenizerConfig, "build": BuildConfig, "verify": VerifyConfig}


def register():
    """Store each command's schema as config 'data_<command>'."""
    cs = ConfigStore.instance()
    for name, node in COMMANDS.items():
        cs.store(name=f"data_{name.replace('-', '_')}", node=node)
