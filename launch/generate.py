"""Sample text from a run dir, a DCP checkpoint or a Hugging Face export, in one process:

    llm-generate path=<...> prompt="ROMEO:" [max_new_tokens=100] [temperature=0.8]
        [top_k=50] [top_p=0.95] [seed=0] [num_samples=1] [tokenizer=<file or folder>] [bos_token= eos_token=]
        [device=cpu|cuda] [chat=true | messages=<file.json or JSON list>] [template=<chat template file>]

(`python launch/generate.py ...` in a checkout is the same command.)

The tokenizer (any format the data pipeline reads) defaults to the folder's own or the run's data.tokenizer, with
the run's data.bos_token/eos_token, and must be the one the model was trained with (its sha256 is in the
checkpoint or the export). Each sample stops at the model's EOS. temperature=0 samples greedily, top_k=0 and
top_p=1 turn those filters off.

A fine-tuned model answers a conversation: chat=true makes the prompt one user turn, messages= gives the turns
([{"role": "system"|"user"|"assistant", "content": ...}, ...], ending with a user turn). They are rendered with the
chat template (template=, default: the run's data.template, else the tokenizer's own, as an export carries it) and
its generation prompt, and tokenized as the chat shards were; each answer stops at the template's end of turn
(Llama 3: <|eot_id|>) or EOS, and only the answer is printed.
"""

import json
import sys
from pathlib import Path

import torch

from data_pipeline.chat import ChatEncoder, RecordError, prompt_messages
from data_pipeline.tokenizer import Tokenizer
from launch.cli_args import RUN_ERRORS, fail, parse_key_values
from model import Llama
from model.generate import check_sampling, generate
from train.interop.hf_import import load_any_weights
from train.interop.hf_tokenizer import (
    EXPORT_MARKER,
    run_markers,
    run_template,
    run_tokenizer,
    trained_tokenizer_sha256,
)
from train.interop.offline_checkpoint import find_checkpoint

# The settings and their defaults.
DEFAULTS = {"prompt": "", "max_new_tokens": 100, "temperature": 0.8, "top_k": 50, "top_p": 0.95, "seed": 0,
            "num_samples": 1}


def load_model(path, device: torch.device) -> Llama:
    """The full model of any checkpoint kind, on `device`, in eval mode."""
    model_cfg, state = load_any_weights(path)
    with torch.device("meta"):
        model = Llama(model_cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    model.init_rope()  # rope tables are not saved: build them (on the weights' device) before moving
    model.to(device)
    return model.eval()


def pick_device(name: str | None) -> torch.device:
    """device=cpu or cuda[:N], checked here rather than deep inside model.to(); default: cuda when present."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"device={name!r} is not a device; pass device=cpu or device=cuda")
    if device.type not in ("cpu", "cuda"):
        fail(f"device={name} is not supported; pass device=cpu or device=cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"device={name}, but torch sees no CUDA GPU on this machine (or is a CPU build); pass device=cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        fail(f"device={name}, but this machine has {torch.cuda.device_count()} CUDA GPU(s); pass device=cuda:0")
    return device


def check_args(args: dict) -> None:
    """Exit with one line naming the first setting that means nothing, before anything is loaded."""
    if args["num_samples"] < 1:
        fail(f"num_samples={args['num_samples']}; pass 1 or more samples to print")
    try:
        check_sampling(args["max_new_tokens"], args["temperature"], args["top_k"], args["top_p"])
    except ValueError as e:
        fail(str(e))


def open_tokenizer(args: dict, source: Path) -> Tokenizer:
    """The tokenizer of args["path"] (or tokenizer=), checked to be the one the model trained with: a file replaced
    since, with other ids for the same text, would sample garbage."""
    tok_path = args.get("tokenizer") or run_tokenizer(args["path"])
    if tok_path is None:
        fail(f"no tokenizer found for {args['path']}; pass tokenizer=<the run's data.tokenizer>")
    if not Path(tok_path).exists():
        fail(f"tokenizer={tok_path}: no such file or folder; pass the run's data.tokenizer")
    run_bos, run_eos = run_markers(args["path"])
    # bos_token='<|begin_of_text|>' as the Hydra commands take it (the quotes that reach Hydra) works here too
    bos, eos = (args.get(k, "").strip("'\"") for k in ("bos_token", "eos_token"))
    tok = Tokenizer(tok_path, bos or run_bos, eos or run_eos, key_prefix="")
    want = trained_tokenizer_sha256(source)
    if want and tok.sha256 != want:
        where = source / EXPORT_MARKER if (source / EXPORT_MARKER).is_file() else source
        named = tok.file if tok.path.is_dir() else tok_path  # a folder's file, which one replaced
        fail(f"{named} is not the tokenizer the model was trained with (sha256 {tok.sha256[:12]}, but {where} "
             f"records {want[:12]}); restore it, or pass tokenizer=<the tokenizer the run trained with>")
    return tok


def load_tokenizer(args: dict) -> Tokenizer:
    """The Tokenizer of args["path"], checked to be the one the model trained with."""
    try:
        return open_tokenizer(args, find_checkpoint(args["path"]))
    except RUN_ERRORS as e:
        fail(str(e))


def load_checked_model(args: dict, tok: Tokenizer, device: torch.device) -> Llama:
    """The model of args["path"], with an embedding row for each of the tokenizer's tokens."""
    try:
        model = load_model(args["path"], device)
    except RUN_ERRORS as e:
        fail(str(e))
    if tok.vocab_size > model.cfg.vocab_size:
        fail(f"{tok.path} has {tok.vocab_size} tokens but the model's vocab is {model.cfg.vocab_size}; "
             f"pass the tokenizer the run was trained with")
    return model


def as_bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(text)
    return text.lower() in ("true", "1")


def chat_messages(args: dict) -> list[dict] | None:
    """The conversation to answer (checked before anything is loaded): messages=, a JSON file or the JSON list
    itself; or chat=true's prompt as one user turn. None: a text prompt to continue."""
    if "messages" not in args:
        if args.get("chat") and not args["prompt"]:
            fail("chat=true needs prompt=<the user's message> (or pass messages=<file.json>)")
        return [{"role": "user", "content": args["prompt"]}] if args.get("chat") else None
    raw, fix = args["messages"], 'pass a JSON file or list of {"role": ..., "content": ...} turns'
    if args["prompt"]:
        fail(f"messages= and prompt= both given; pass the user's message as the last turn of messages= ({fix})")
    inline = raw.lstrip().startswith(("[", "{"))  # the JSON itself, else a file of it
    if not inline and not Path(raw).is_file():
        fail(f"messages={raw}: no such file; {fix}")
    try:
        return prompt_messages(json.loads(raw if inline else Path(raw).read_text(encoding="utf-8")))
    except RecordError as e:
        fail(f"messages={args['messages']}: {e}")
    except ValueError as e:  # not JSON, not UTF-8
        fail(f"messages={args['messages']}: not JSON ({e}); {fix}")


def chat_prompt(args: dict, tok: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(prompt ids, the ids that end an answer): the conversation rendered with the chat template and its
    generation prompt, tokenized as the chat shards are (special tokens as one id each); an answer ends at the
    template's end of turn (the first special token after an assistant turn's text) or at the tokenizer's EOS."""
    template = args.get("template") or run_template(args["path"])
    key = "template" if args.get("template") else "data.template (the run's config.yaml)"
    if template and not Path(template).is_file():
        fail(f"{key}={template}: no such file; pass template=<the chat template file the model was trained with>")
    try:
        encoder = ChatEncoder(tok, template)
        return encoder.encode_prompt(messages), sorted({encoder.turn_end_id(), tok.eos_id} - {None})
    except ValueError as e:  # no template, one that does not parse or render
        fail(f"{'messages' if 'messages' in args else 'chat=true'}: {e}")


def prompt_of(args: dict, tok: Tokenizer, messages: list[dict] | None) -> tuple[list[int], list[int], int]:
    """(prompt ids, the ids that end a sample, how many ids of a sample to leave unprinted): a text prompt is
    printed with its continuation (BOS left out), a conversation's answer alone."""
    if messages is None:
        return [tok.bos_id] + tok.encode(args["prompt"]), [tok.eos_id], 1
    prompt_ids, stops = chat_prompt(args, tok, messages)
    return prompt_ids, stops, len(prompt_ids)


def warn_if_out_of_view(prompt_tokens: int, new_tokens: int, max_seq_len: int) -> None:
    """One warning line where the model cannot see the whole prompt while it samples: it sees only the last
    max_seq_len tokens (model/generate.py's window), so a longer prompt is cut from the front."""
    if prompt_tokens > max_seq_len:
        print(f"warning: the prompt is {prompt_tokens} tokens (BOS included), more than the model's max_seq_len="
              f"{max_seq_len}: it samples from the last {max_seq_len} only (the first {prompt_tokens - max_seq_len} "
              f"tokens and BOS are not seen); shorten the prompt", file=sys.stderr)
    elif prompt_tokens + new_tokens - 1 > max_seq_len:
        print(f"warning: the prompt ({prompt_tokens} tokens, BOS included) and max_new_tokens={new_tokens} exceed the "
              f"model's max_seq_len={max_seq_len}: after {max_seq_len - prompt_tokens + 1} new tokens the start of "
              f"the prompt drops out of view, one token per token sampled", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """`llm-generate`: argv (default: the command line's) as key=value words."""
    spec = {"path": str, "prompt": str, "max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float,
            "seed": int, "num_samples": int, "tokenizer": str, "bos_token": str, "eos_token": str, "device": str,
            "chat": as_bool, "messages": str, "template": str}
    args = {**DEFAULTS, **parse_key_values(sys.argv[1:] if argv is None else argv, spec, ("path",), __doc__.strip())}
    check_args(args)
    messages = chat_messages(args)
    device = pick_device(args.get("device"))
    tok = load_tokenizer(args)
    prompt_ids, stops, hidden = prompt_of(args, tok, messages)  # a bad template fails before the model loads
    model = load_checked_model(args, tok, device)
    warn_if_out_of_view(len(prompt_ids), args["max_new_tokens"], model.cfg.max_seq_len)
    ids = torch.tensor([prompt_ids] * args["num_samples"], device=device)
    torch.manual_seed(args["seed"])
    out = generate(model, ids, args["max_new_tokens"], temperature=args["temperature"], top_k=args["top_k"],
                   top_p=args["top_p"], eos_id=stops)
    for i, row in enumerate(out.tolist()):
        if i:
            print("-" * 40)
        # Stop at the first end of each sample (a batch runs until all samples end).
        row = row[hidden:]
        end = next((j for j, token in enumerate(row) if token in stops), len(row))
        print(tok.decode(row[:end]))


if __name__ == "__main__":
    main()
