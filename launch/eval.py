"""Evaluate a model on data: loss, perplexity and bits per byte of each source, as a table and a JSON file:

    llm-eval checkpoint=<run dir | DCP step folder | Hugging Face folder> data=[<source>,...]
        [tokenizer=<file or folder>] [seq_len=N] [batch_size=N] [max_batches=N] [out=results.json]
        [device=cpu|cuda] [txt_mode=file|line|paragraph] [text_field=text] [bos_token= eos_token=]
        [format=text|chat] [template=<chat template file>] [overlong=drop|truncate]
    torchrun --nproc_per_node=N launch/eval.py ... [tp=N] [pp=N] [pp_schedule=1F1B] [cp=N]
        (the model laid out as training lays it out: FSDP2 over the data-parallel ranks, tensor, pipeline and
        context parallel as given; parallel.tp= and so on are the same keys)
    llm-eval checkpoint=... tasks=[hellaswag,my_task] [task_dir=<folder of task YAMLs>] [limit=N]

(`python launch/eval.py ...` in a checkout is the same command as llm-eval.)

tasks= runs lm-evaluation-harness's tasks (pip install 'lm_eval>=0.4') on the model itself
(train/evaluation/harness.py): hub tasks whose datasets are cached, or tasks defined in task_dir's YAMLs over local
files. Their metrics go into out= under "tasks", and each request with our log-likelihood into <out>.samples.jsonl.
Under torchrun every rank runs them on the model as laid out, with one process's figures, and rank 0 writes the
results; under pp= each window goes through the schedule padded to seq_len, so a request longer than seq_len is cut
to it (one process: to the model's max_seq_len; pass seq_len=<that> for the same figures). Log-likelihood requests
are scored batch_size / data-parallel ranks to a forward, the longest first (under pp=: a step's rows).

A source is a shard-set folder (its validation split, read in order exactly as training's validation reads it;
folder:train for its training split) or raw text: .txt, .jsonl/.json, .parquet files, folders or globs of them,
tokenized as the shard builder does (a .txt file is one document unless txt_mode=line or paragraph; records'
text_field), streamed a few documents at a time. A run dir means its newest checkpoint. The tokenizer defaults to
the folder's own or the run's data.tokenizer and must be the one the model was trained with.

format=chat (default: the run's data.format) scores conversations: .jsonl/.json/.parquet records of `messages` or
`prompt`/`completion`, rendered with template= (default: the run's data.template, else the tokenizer's own) and
packed whole into windows, or a shard set built with format=chat; the loss is over the assistant turns alone (their
content and end of turn), each conversation attending only to itself. A conversation longer than seq_len + 1 tokens
is dropped or truncated (overlong=, default: the run's data.overlong, else drop), and counted in the output.

Defaults: seq_len and batch_size are the run's data.seq_len and micro_batch_size (an HF folder: the model's
max_seq_len up to 2048, and 8); max_batches: all. batch_size counts the rows of a batch over all data-parallel
ranks (processes / (tp x pp x cp)), so any layout evaluates the same windows: with batch_size=<the run's
micro_batch_size x its data-parallel ranks> and max_batches=<its val_batches>, a run's shard set gives the run's
own validation loss. Loss is in nats per predicted token; bits per byte = total nats / ln 2 / UTF-8 bytes of
the text predicted (BOS and EOS are predicted but stand for no bytes). One process runs on device= (default: cuda
when present; bf16 compute on CUDA, fp32 on CPU); under torchrun each rank uses its GPU, or the CPU without one.
Results go to out=, by default <run dir>/eval.json for a run or one of its checkpoints, else (an HF folder, a lone
checkpoint, a run dir that is not writable) ./eval.json. While a source is evaluated, rank 0 shows a bar on stderr
(tokens done, tokens/s, time left), or without a terminal (SLURM, a pipe) logs those figures every 30 s.
"""

import json
import logging
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from data_pipeline.chat import ChatEncoder
from data_pipeline.sources import TXT_MODES
from launch.cli_args import RUN_ERRORS, fail, parse_key_values
from launch.generate import load_model, open_tokenizer, pick_device
from train.evaluation.evaluate import (
    Placement,
    Settings,
    check_seq_len,
    check_sources,
    default_out,
    default_seq_len,
    evaluate,
    format_table,
    is_shard_set,
    json_record,
    load_parallel,
    run_config,
    source_model_config,
)
from train.interop.offline_checkpoint import find_checkpoint


def as_list(text: str) -> list[str]:
    """data=[a,b] or data=a -> ["a", "b"] / ["a"]."""
    return [p.strip().strip("'\"") for p in text.strip().removeprefix("[").removesuffix("]").split(",") if p.strip()]


SPEC = {"checkpoint": str, "data": as_list, "tokenizer": str, "seq_len": int, "batch_size": int, "max_batches": int,
        "out": str, "device": str, "txt_mode": str, "text_field": str, "bos_token": str, "eos_token": str,
        "tasks": as_list, "task_dir": str, "limit": int, "format": str, "template": str, "overlong": str}
LAYOUT = {"tp": int, "pp": int, "cp": int, "pp_schedule": str}  # training's parallel.* keys, which are taken too
SPEC |= LAYOUT | {f"parallel.{key}": kind for key, kind in LAYOUT.items()}
FORMATS, OVERLONG = ("text", "chat"), ("drop", "truncate")


def chat_options(args: dict, run: dict) -> tuple[bool, str, str]:
    """(format=chat?, template, overlong): given, else the run's data.format/template/overlong, else the defaults."""
    data = run.get("data", {})
    fmt = args.get("format", data.get("format") or "text")
    overlong = args.get("overlong", data.get("overlong") or "drop")
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is not one of {list(FORMATS)}")
    if overlong not in OVERLONG:
        raise ValueError(f"overlong={overlong!r} is not one of {list(OVERLONG)}")
    return fmt == "chat", args.get("template", data.get("template") or ""), overlong


def settings_of(args: dict, run: dict, model_cfg) -> Settings:
    """The evaluation settings: given, else the run's, else the defaults; checked here (one line each)."""
    data = run.get("data", {})
    chat, template, overlong = chat_options(args, run)
    s = Settings(seq_len=args["seq_len"] if "seq_len" in args else default_seq_len(run, model_cfg),
                 batch_size=args.get("batch_size", run.get("micro_batch_size") or 8),
                 max_batches=args.get("max_batches"),
                 positions=bool(data.get("document_positions") or data.get("document_masking")),
                 mask_boundary_loss=bool(data.get("mask_boundary_loss")),
                 txt_mode=args.get("txt_mode", "file"), text_field=args.get("text_field", "text"),
                 chat=chat, template=template, overlong=overlong)
    check_seq_len(s.seq_len, model_cfg)
    if s.max_batches is not None and s.max_batches < 1:
        raise ValueError(f"max_batches={s.max_batches}; pass 1 or more (or leave it out: all)")
    if s.txt_mode not in TXT_MODES:
        raise ValueError(f"txt_mode={s.txt_mode!r} is not one of {list(TXT_MODES)}")
    return s


def load(args: dict, distributed: bool):
    """(placement, tokenizer, model): on one process, or under torchrun each rank with its part of the model. The
    tokenizer is checked against the checkpoint before any weight is read."""
    if distributed and "device" in args:
        fail("device= is for one process; under torchrun each rank uses its GPU (or the CPU without one)")
    run = run_config(args["checkpoint"])
    try:
        chat, template, _ = chat_options(args, run)
        masking = chat or bool(run.get("data", {}).get("document_masking"))  # packed conversations stay apart
        source = find_checkpoint(args["checkpoint"])
        model_cfg = source_model_config(source)
        tok = open_tokenizer({**args, "path": args["checkpoint"]}, source)  # a file that is no tokenizer: one line
        if chat and not all(map(is_shard_set, args.get("data", []))):
            ChatEncoder(tok, template)  # no template, a missing or broken one: one line before the weights load
    except RUN_ERRORS as e:
        fail(str(e))
    if tok.vocab_size > model_cfg.vocab_size:
        fail(f"{tok.path} has {tok.vocab_size} tokens but the model's vocab is {model_cfg.vocab_size}; "
             f"pass the tokenizer the run was trained with")
    try:
        if distributed:
            where = load_layout(args, run, model_cfg, masking)
            return where, tok, where.runner.model
        device = pick_device(args.get("device"))
        model = load_model(args["checkpoint"], device)
        model.document_masking = masking
        return Placement(device, torch.bfloat16 if device.type == "cuda" else None), tok, model
    except RUN_ERRORS as e:
        fail(str(e))


def load_layout(args: dict, run: dict, model_cfg, masking: bool) -> Placement:
    """This rank of torchrun's, with the step runner of the model laid out by tp=, pp=, pp_schedule= and cp= (FSDP2
    over the rest), as training lays it out; the layout and the batch checked first, in one line each."""
    from train.config import ParallelSection
    from train.parallel.distributed import init_distributed

    layout = ParallelSection(**{key: args[key] for key in LAYOUT if key in args})
    layout.check(int(os.environ["WORLD_SIZE"]))
    settings = settings_of(args, run, model_cfg)
    env = init_distributed(tp=layout.tp, pp=layout.pp, cp=layout.cp)
    return Placement.of(env, load_parallel(args["checkpoint"], layout, settings, env, masking))


def write_results(record: dict, out: Path) -> None:
    """The JSON file, written whole or not at all."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        fail(f"cannot write out={out} ({e.strerror or e}); pass out=<a writable file>")


def check_args(args: dict, distributed: bool) -> None:
    """One line for what is missing or cannot go together, before anything is loaded."""
    if "data" not in args and "tasks" not in args:
        fail("pass data=[...] (sources to score), tasks=[...] (lm-eval tasks), or both; run with --help for usage")
    if not distributed and any(key in args for key in LAYOUT):
        fail("tp=, pp=, cp= and pp_schedule= lay the model out over torchrun's ranks: run torchrun "
             "--nproc_per_node=N launch/eval.py ... with them (one process needs none)")
    if "data" in args:
        try:
            check_sources(args["data"])  # a missing path fails before anything is loaded
        except RUN_ERRORS as e:
            fail(str(e))


def score(args: dict, tok, model, where: Placement) -> tuple[dict, list[dict]]:
    """The data's rows and lm-eval's tasks, printed on rank 0: (the JSON record, lm-eval's per-request records)."""
    record, requests = {"checkpoint": args["checkpoint"]}, []
    try:
        if "data" in args:
            settings = settings_of(args, run_config(args["checkpoint"]), model.cfg)
            rows = evaluate(model, tok, args["data"], settings, where)
            record = json_record(args["checkpoint"], rows, settings, where.processes)
            if where.main:
                print(format_table(rows))
        if "tasks" in args:
            record["tasks"], requests = score_tasks(args, tok, model, where)
    except (*RUN_ERRORS, ImportError) as e:
        fail(str(e))
    return record, requests


def score_tasks(args: dict, tok, model, where: Placement) -> tuple[dict, list[dict]]:
    """lm-eval's tasks on the model, printed on rank 0. Under torchrun every rank runs lm-eval whole, in the same
    order, on the model as laid out (train/loop/downstream.py scoring: TP's windows padded and their logits
    gathered, PP's through the schedule with the last stage's figures broadcast), lm-eval's log lines on rank 0 only."""
    from train.evaluation.harness import format_tasks, run_tasks
    from train.loop.downstream import as_local_rank_0, quiet_lm_eval, scoring

    run = run_config(args["checkpoint"])
    chat, template, _ = chat_options(args, run)
    layout = scoring(where.runner, where.tp, where.pp) if where.runner is not None else {}
    batch_size = args.get("batch_size", run.get("micro_batch_size") or 8)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: pass 1 or more (continuations scored per forward, over all ranks)")
    rows = max(1, batch_size // where.world)  # each data-parallel rank's share, as data= reads them
    with quiet_lm_eval(not where.main) if where.processes > 1 else nullcontext(), as_local_rank_0():
        table, requests = run_tasks(model, tok, where.device, args["tasks"], args.get("task_dir"), args.get("limit"),
                                    ChatEncoder(tok, template) if chat else None, rows=rows, **layout)
    if where.main:
        print(format_tasks(table))
    return table, requests


def main(argv: list[str] | None = None) -> None:
    """`llm-eval`: argv (default: the command line's) as key=value words. While it runs, rank 0's progress goes
    to stderr: a bar on a terminal, else a log line every half minute (data_pipeline/progress.py)."""
    log, lines = logging.getLogger("train"), logging.StreamHandler()  # stderr, as it is now; the table: stdout
    lines.setFormatter(logging.Formatter("%(message)s"))
    level = log.level
    log.addHandler(lines)
    log.setLevel(logging.INFO)
    try:
        run(argv)
    finally:  # as it was, so that main() can run again in one process (as the tests run it)
        log.removeHandler(lines)
        log.setLevel(level)


def run(argv: list[str] | None) -> None:
    args = parse_key_values(sys.argv[1:] if argv is None else argv, SPEC, ("checkpoint",), __doc__.strip())
    args = {key.removeprefix("parallel."): value for key, value in args.items()}  # parallel.tp= is tp=
    distributed = "WORLD_SIZE" in os.environ  # torchrun's
    check_args(args, distributed)
    where, tok, model = load(args, distributed)
    record, requests = score(args, tok, model, where)
    if where.main:
        out = Path(args["out"]) if "out" in args else default_out(args["checkpoint"])
        write_results(record, out)
        print(f"wrote {out}")
        if requests:  # lm-eval's requests with our answers, one JSON line each
            samples = out.with_suffix(".samples.jsonl")
            samples.write_text("".join(json.dumps(r) + "\n" for r in requests))
            print(f"wrote {samples}")
    if distributed:
        from train.parallel.distributed import destroy_distributed

        destroy_distributed()


if __name__ == "__main__":
    main()
