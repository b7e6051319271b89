"""Sample text from a run dir, a DCP checkpoint or a Hugging Face export, in one process:

    llm-generate path=<...> prompt="ROMEO:" [max_new_tokens=100] [temperature=0.8]
        [top_k=50] [top_p=0.95] [seed=0] [num_samples=1] [tokenizer=<file or folder>] [bos_token= eos_token=]
        [device=cpu|cuda]

(`python launch/generate.py ...` in a checkout is the same command.)

The tokenizer (any format the data pipeline reads) defaults to the folder's own or the run's data.tokenizer, with
the run's data.bos_token/eos_token, and must be the one the model was trained with (its sha256 is in the
checkpoint or the export). Each sample stops at the model's EOS. temperature=0 samples greedily, top_k=0 and
top_p=1 turn those filters off.
"""

import sys
from pathlib import Path

import torch

from data_pipeline.tokenizer import Tokenizer
from launch.cli_args import RUN_ERRORS, fail, parse_key_values
from model import Llama
from model.generate import check_sampling, generate
from train.interop.hf_import import load_any_weights
from train.interop.hf_tokenizer import EXPORT_MARKER, run_markers, run_tokenizer, trained_tokenizer_sha256
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


def load_tokenizer_and_model(args: dict, device: torch.device):
    """(Tokenizer, model) of args["path"], the tokenizer checked to be the one it trained with."""
    try:
        tok = open_tokenizer(args, find_checkpoint(args["path"]))
        model = load_model(args["path"], device)
    except RUN_ERRORS as e:
        fail(str(e))
    if tok.vocab_size > model.cfg.vocab_size:
        fail(f"{tok.path} has {tok.vocab_size} tokens but the model's vocab is {model.cfg.vocab_size}; "
             f"pass the tokenizer the run was trained with")
    return tok, model


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
            "seed": int, "num_samples": int, "tokenizer": str, "bos_token": str, "eos_token": str, "device": str}
    args = {**DEFAULTS, **parse_key_values(sys.argv[1:] if argv is None else argv, spec, ("path",), __doc__.strip())}
    check_args(args)
    device = pick_device(args.get("device"))
    tok, model = load_tokenizer_and_model(args, device)
    prompt_ids = [tok.bos_id] + tok.encode(args["prompt"])
    warn_if_out_of_view(len(prompt_ids), args["max_new_tokens"], model.cfg.max_seq_len)
    ids = torch.tensor([prompt_ids] * args["num_samples"], device=device)
    torch.manual_seed(args["seed"])
    out = generate(model, ids, args["max_new_tokens"], temperature=args["temperature"], top_k=args["top_k"],
                   top_p=args["top_p"], eos_id=tok.eos_id)
    for i, row in enumerate(out.tolist()):
        if i:
            print("-" * 40)
        # Stop at the first EOS of each sample (a batch runs until all samples end).
        row = row[1:]
        print(tok.decode(row[: row.index(tok.eos_id)] if tok.eos_id in row else row))


if __name__ == "__main__":
    main()
