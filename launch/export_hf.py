"""Export a checkpoint as a Hugging Face transformers Llama folder:

    llm-export-hf checkpoint=<run dir or checkpoint dir> out=<dir> [tokenizer=<file or folder>]
        [dtype=fp32|bf16|fp16] [max_shard_gb=5] [overwrite=false] [template=<chat template file>]

(`python launch/export_hf.py ...` in a checkout is the same command.)

A run dir exports its newest complete checkpoint; the tokenizer (SentencePiece .model, tokenizer.json or a folder
holding one, Meta's tiktoken tokenizer.model) defaults to the run's data.tokenizer and must be the one the run
trained with (its sha256 is in the checkpoint); its files go next to the weights so that transformers' AutoTokenizer
encodes as the run did. `out` may be a new folder in the run (beside its checkpoints: out=<run>/hf), but not the
run, a folder holding it, or one in its checkpoints or logs; overwrite=true replaces only a previous export.
The chat template (template=, default: the run's data.template, else the tokenizer's own) goes in the export's
tokenizer_config.json as `chat_template`, so that transformers' apply_chat_template renders as the run trained.
While it writes, a bar on stderr shows the bytes and files written (without a terminal: a line every 30 s).
"""

import logging
import sys
from pathlib import Path

import torch

from launch.cli_args import RUN_ERRORS, fail, parse_key_values
from model.meta import is_meta_folder
from train.interop.hf_export import export_hf
from train.interop.hf_tokenizer import run_markers, run_template, run_tokenizer
from train.interop.offline_checkpoint import find_checkpoint, is_hf_folder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def as_bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(text)
    return text.lower() in ("true", "1")


def template_file(args: dict) -> str:
    """template=, else the run's data.template: the chat template file the run's shards were built with ("" =
    the tokenizer's own), checked to be there before anything is written."""
    template = args.get("template") or run_template(args["checkpoint"])
    if template and not Path(template).exists():
        key = "template" if args.get("template") else "data.template (the run's config.yaml)"
        fail(f"{key}={template}: no such file; pass template=<the chat template file (or model folder) the run "
             f"was trained with>")
    return template


def main(argv: list[str] | None = None) -> None:
    """`llm-export-hf`: argv (default: the command line's) as key=value words."""
    spec = {"checkpoint": str, "out": str, "tokenizer": str, "dtype": str, "max_shard_gb": float, "overwrite": as_bool,
            "template": str}
    args = parse_key_values(sys.argv[1:] if argv is None else argv, spec, ("checkpoint", "out"), __doc__.strip())
    if args.get("dtype", "fp32") not in DTYPES:
        fail(f"dtype={args['dtype']!r}; choose one of {sorted(DTYPES)} (default: as saved)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        source = find_checkpoint(args["checkpoint"])
        if is_hf_folder(source) or is_meta_folder(source):
            kind = "a Hugging Face folder" if is_hf_folder(source) else "Meta's original checkpoint"
            fail(f"{source} is {kind}, not a run; pass a run dir or a DCP checkpoint")
        tokenizer = args.get("tokenizer") or run_tokenizer(args["checkpoint"])
        if tokenizer is None:
            logging.warning("no tokenizer given or found in the run's config.yaml: exporting weights only")
        out = export_hf(source, args["out"], tokenizer_path=tokenizer,
                        max_shard_bytes=int(args.get("max_shard_gb", 5) * 2**30),
                        dtype=DTYPES.get(args.get("dtype")), overwrite=args.get("overwrite", False),
                        markers=run_markers(args["checkpoint"]), template=template_file(args))
    except RUN_ERRORS as e:  # bad input, or a full disk: one line
        fail(str(e))
    print(f"wrote {out.resolve()} (from {source})")


if __name__ == "__main__":
    main()
