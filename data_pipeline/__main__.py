"""CLI: python -m data_pipeline {train-tokenizer,build,verify} key=value ... (Hydra overrides)."""

import contextlib
import json
import logging
import sys

USAGE = """usage: python -m data_pipeline COMMAND key=value ...
  train-tokenizer inputs=[a.jsonl,dir/] model_path=tok.model vocab_size=8192 [text_field= txt_mode=file|line|paragraph]
                  [encoding_errors=strict|replace overwrite=false]
  build           inputs=[...] out_dir=shards/ tokenizer=tok.model|tokenizer.json|hf_folder/
                  [val_fraction=0.01 | val_docs=N] [bos_token= eos_token=] [format=text|chat template=]
                  [num_proc= shard_tokens= encoding_errors=strict|replace overwrite=false part_bytes=]
                  [parts=N part=K]  build part K of N only (a SLURM array task); parts=N alone merges them
  verify          out_dir=shards/ [tokenizer=... bos_token= eos_token=]
  COMMAND --help  prints the command's full config"""


def compose(command: str, overrides: list[str]):
    """Hydra compose of the command's structured config with command-line overrides, as a dataclass."""
    from hydra import compose as hydra_compose
    from hydra import initialize
    from omegaconf import OmegaConf

    from .config import register
    register()
    with initialize(version_base=None, config_path=None):
        composed = hydra_compose(config_name=f"data_{command.replace('-', '_')}", overrides=overrides)
    return OmegaConf.to_object(composed)  # raises on a missing mandatory value, naming it


def train_tokenizer(tokenizer_cfg):
    from .tokenizer import train_tokenizer
    tok = train_tokenizer(tokenizer_cfg.inputs, tokenizer_cfg.model_path, tokenizer_cfg.vocab_size,
                          text_field=tokenizer_cfg.text_field, txt_mode=tokenizer_cfg.txt_mode,
                          max_chars=tokenizer_cfg.max_chars, seed=tokenizer_cfg.seed,
                          encoding_errors=tokenizer_cfg.encoding_errors, overwrite=tokenizer_cfg.overwrite)
    print(f"wrote {tok.path} (vocab {tok.vocab_size}, sha256 {tok.sha256[:12]})")


@contextlib.contextmanager
def logging_to_stdout():
    """The builder's lines (resuming, parts, progress without a terminal) on stdout while it runs; errors: stderr.
    Undone after, so that main() can run again in one process (as the tests run it)."""
    from .build import log
    handler, level = logging.StreamHandler(sys.stdout), log.level
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def build(build_cfg):
    from .tokenizer import Tokenizer
    tok = Tokenizer(build_cfg.tokenizer, build_cfg.bos_token, build_cfg.eos_token, key_prefix="")
    if build_cfg.format not in ("text", "chat"):
        raise ValueError(f"format={build_cfg.format} is not one of text, chat")
    if build_cfg.template and build_cfg.format != "chat":
        raise ValueError(f"template={build_cfg.template} renders conversations: pass format=chat with it")
    with logging_to_stdout():
        path = build_chat(build_cfg, tok) if build_cfg.format == "chat" else build_text(build_cfg, tok)
    if path is None:  # one part of an array built, others not yet: the log said which
        return
    m = json.loads(path.read_text())
    splits = ", ".join(f"{s} {v['tokens']:,} tokens / {v['documents']:,} docs / {len(v['shards'])} shards"
                       for s, v in m["splits"].items())
    print(f"wrote {path}: {splits} ({m['input_bytes'] / 1e6:.1f} MB in {m['build_seconds']:.1f}s)")


def build_text(build_cfg, tok):
    from .build import build_shards
    return build_shards(build_cfg.inputs, build_cfg.out_dir, tok, text_field=build_cfg.text_field,
                        txt_mode=build_cfg.txt_mode, val_fraction=build_cfg.val_fraction, val_docs=build_cfg.val_docs,
                        shard_tokens=build_cfg.shard_tokens, num_proc=build_cfg.num_proc, seed=build_cfg.seed,
                        overwrite=build_cfg.overwrite, encoding_errors=build_cfg.encoding_errors,
                        parts=build_cfg.parts, part=build_cfg.part, part_bytes=build_cfg.part_bytes)


def build_chat(build_cfg, tok):
    """format=chat: conversations whole, with their trained-token masks (data_pipeline/chat_build.py)."""
    from .chat_build import build_chat_shards
    if build_cfg.parts is not None or build_cfg.text_field != "text" or build_cfg.txt_mode != "file":
        raise ValueError("format=chat builds in one pass and reads `messages` or `prompt`/`completion` records: "
                         "drop parts=/part=, text_field= and txt_mode=")
    return build_chat_shards(build_cfg.inputs, build_cfg.out_dir, tok, template=build_cfg.template,
                             val_fraction=build_cfg.val_fraction, val_docs=build_cfg.val_docs,
                             shard_tokens=build_cfg.shard_tokens, num_proc=build_cfg.num_proc, seed=build_cfg.seed,
                             overwrite=build_cfg.overwrite)


def verify(verify_cfg):
    """Every claim of the manifest: totals, each shard's size, header, checksum and ids, the document counts."""
    from .manifest import SplitAbsent
    from .shardset import ShardSet
    from .tokenizer import Tokenizer
    sha = None
    if verify_cfg.tokenizer:
        sha = Tokenizer(verify_cfg.tokenizer, verify_cfg.bos_token, verify_cfg.eos_token, key_prefix="").sha256
    for split in ("train", "val"):
        try:
            s = ShardSet.open(verify_cfg.out_dir, split, expect_tokenizer_sha256=sha, verify=True)
        except SplitAbsent:
            if split == "val":  # a set built without a validation split
                continue
            raise
        print(f"ok {s.name}: {s.n_tokens:,} tokens, {s.n_documents:,} documents, {len(s.paths)} shards, "
              f"totals, checksums and ids verified")


def run(command: str, command_cfg):
    {"train-tokenizer": train_tokenizer, "build": build, "verify": verify}[command](command_cfg)


def command_help(command: str) -> str:
    """The command's keys, one a line: name, default ((required) where it has none) and what it does."""
    from omegaconf import OmegaConf

    from .config import COMMANDS, descriptions
    schema = COMMANDS[command]
    defaults = OmegaConf.structured(schema)
    shown = {name: "(required)" if OmegaConf.is_missing(defaults, name) else
             OmegaConf.to_yaml({name: defaults[name]}).split(":", 1)[1].strip() for name in defaults}
    width = max(len(f"{name}={value}") for name, value in shown.items())
    lines = [schema.__doc__.strip(), f"usage: python -m data_pipeline {command} key=value ..."]
    lines += [f"  {f'{name}={shown[name]}':<{width}}  {text}" for name, text in descriptions(schema).items()]
    return "\n".join(lines)


def first_line(e: BaseException) -> str:
    return " ".join(str(e).strip().split("\n")[0].split())


def main(argv: list[str]) -> int:
    from .config import COMMANDS
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, overrides = argv[0], argv[1:]
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    try:
        if "--help" in overrides:
            print(command_help(command))
            return 0
        run(command, compose(command, overrides))
    except (HydraException, OmegaConfBaseException) as e:  # a misspelt, mistyped or missing key
        cause = f": {first_line(e.__cause__)}" if e.__cause__ else ""
        hint = f"see `python -m data_pipeline {command} --help`"
        print(f"error: {first_line(e).rstrip('.')}{cause}; {hint}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:  # bad input, offline, a full disk: one line, no traceback
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        chat = "format=chat" in overrides  # one pass, nothing kept: a rerun starts over
        resume = "; the parts built are kept: the same command resumes" if command == "build" and not chat else ""
        print(f"interrupted{resume}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
