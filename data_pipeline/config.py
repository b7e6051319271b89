"""Structured (Hydra) configs of the data commands: a misspelt key fails with the key's name. Each field's comment on
its own line is the one-line description `python -m data_pipeline COMMAND --help` prints (descriptions())."""

import dataclasses
import inspect
import io
import tokenize
from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TrainTokenizerConfig:
    """train-tokenizer: a SentencePiece BPE model trained on a sample of the inputs."""
    inputs: list[str] = MISSING  # files, directories, globs or hf:owner/name of text to train on
    model_path: str = MISSING  # where the .model file goes
    vocab_size: int = 8192  # pieces in the vocabulary, special tokens included
    text_field: str = "text"  # the field of .jsonl/.json/.parquet records that holds the text
    txt_mode: str = "file"  # a .txt file is one document (file), one per line (line) or per blank-line paragraph
    max_chars: int = 200_000_000  # train on a seeded sample of at most this much text
    seed: int = 0  # decides the sample
    encoding_errors: str = "strict"  # .txt inputs with invalid UTF-8: strict (fail naming the byte) | replace
    overwrite: bool = False  # replace an existing model_path


@dataclass
class BuildConfig:
    """build: raw text tokenized into shards (out_dir/{train,val}/*.bin) and out_dir/manifest.json."""
    inputs: list[str] = MISSING  # files, directories, globs or hf:owner/name of text to tokenize
    out_dir: str = MISSING  # the shard set's folder (written whole or not at all)
    # a SentencePiece .model, a tokenizer.json or a Hugging Face folder holding one, or Llama 3's tiktoken
    # tokenizer.model (detected from the file)
    tokenizer: str = MISSING  # a SentencePiece .model, tokenizer.json, HF folder or Llama 3 tiktoken file
    bos_token: str = ""  # the token that starts each document; "" = the one the tokenizer's configuration names
    eos_token: str = ""  # the token that ends each document (never <|eot_id|>); "" = the configured one
    text_field: str = "text"  # the field of .jsonl/.json/.parquet records that holds the text
    txt_mode: str = "file"  # a .txt file is one document (file), one per line (line) or per blank-line paragraph
    # chat: .jsonl/.parquet records of `messages` (or `prompt`/`completion`) rendered with the tokenizer's chat
    # template, with a mask of the trained (assistant) tokens beside the tokens (data_pipeline/chat.py)
    format: str = "text"  # text (documents) | chat (conversations, trained on the assistant turns only)
    template: str = ""  # format=chat: a Jinja chat template file; "" = the tokenizer's own (tokenizer_config.json)
    val_fraction: float = 0.0  # share of documents held out for validation (or val_docs)
    val_docs: int = 0  # number of documents held out for validation (or val_fraction)
    shard_tokens: int = 1 << 27  # tokens per shard file (128M: 256 MiB as uint16)
    num_proc: Optional[int] = None  # tokenizing processes; null = all cores
    seed: int = 0  # decides the train/val split
    encoding_errors: str = "strict"  # .txt inputs with invalid UTF-8: strict (fail naming the byte) | replace
    overwrite: bool = False  # replace a previous shard set in out_dir (never anything else)
    # one task of a SLURM array (launch/slurm/build_shards.sbatch): build only part `part` (0-based) of `parts`;
    # the task that finds all parts built merges them. parts=N without part: merge the N parts, build none
    parts: Optional[int] = None  # a SLURM array's size: build part `part` of them; parts=N alone merges N parts
    part: Optional[int] = None  # the part (0-based, the array task id) this command builds
    # one machine: input text per part, the most work a crash or Ctrl-C loses (a rerun skips the parts built)
    part_bytes: int = 1 << 30  # text per resumable part: the most work a crash or Ctrl-C loses


@dataclass
class VerifyConfig:
    """verify: every claim of a shard set's manifest checked against its shards."""
    out_dir: str = MISSING  # the shard set's folder
    tokenizer: Optional[str] = None  # also check the shards were built with this tokenizer (file or folder)
    bos_token: str = ""  # as the build was given it
    eos_token: str = ""  # as the build was given it


COMMANDS = {"train-tokenizer": TrainTokenizerConfig, "build": BuildConfig, "verify": VerifyConfig}


def register():
    """Store each command's schema as config 'data_<command>'."""
    cs = ConfigStore.instance()
    for name, node in COMMANDS.items():
        cs.store(name=f"data_{name.replace('-', '_')}", node=node)


def descriptions(schema) -> dict[str, str]:
    """Each field of a config dataclass with the comment at the end of its line (the longer comment above some
    fields is for readers of this file)."""
    first_name, comments = {}, {}  # by line: the first name on it (a field's), its comment
    for token in tokenize.generate_tokens(io.StringIO(inspect.getsource(schema)).readline):
        if token.type == tokenize.NAME:
            first_name.setdefault(token.start[0], token.string)
        elif token.type == tokenize.COMMENT and token.start[0] in first_name:
            comments[first_name[token.start[0]]] = token.string.lstrip("#").strip()
    return {f.name: comments.get(f.name, "") for f in dataclasses.fields(schema)}
