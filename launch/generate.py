"""Sample text from a run dir, a DCP checkpoint or a Hugging Face export, in one process:

    python launch/generate.py path=<...> prompt="ROMEO:" [max_new_tokens=100] [temperature=0.8]
        [top_k=50] [top_p=0.95] [seed=0] [num_samples=1] [tokenizer=<.model>] [device=cpu|cuda]

The tokenizer defaults to the export's tokenizer.model or the run's data.tokenizer.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

from launch.cli_args import fail, parse_key_values  # noqa: E402
from model import Llama  # noqa: E402
from model.generate import generate  # noqa: E402
from train.hf_import import load_any_weights  # noqa: E402
from train.hf_tokenizer import run_tokenizer  # noqa: E402


def load_model(path, device: torch.device) -> Llama:
    """The full model of any checkpoint kind, on `device`, in eval mode."""
    cfg, state = load_any_weights(path)
    with torch.device("meta"):
        model = Llama(cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    model.init_rope()  # rope tables are not saved: build them (on the weights' device) before moving
    model.to(device)
    return model.eval()


def main(argv: list[str]) -> None:
    spec = {"path": str, "prompt": str, "max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float,
            "seed": int, "num_samples": int, "tokenizer": str, "device": str}
    args = parse_key_values(argv, spec, ("path",), __doc__.strip())
    device = torch.device(args.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        import sentencepiece as spm

        tok_path = args.get("tokenizer") or run_tokenizer(args["path"])
        if tok_path is None:
            fail(f"no tokenizer found for {args['path']}; pass tokenizer=<SentencePiece .model>")
        if not Path(tok_path).is_file():
            fail(f"tokenizer={tok_path}: no such file; pass the run's SentencePiece .model")
        sp = spm.SentencePieceProcessor(model_file=str(tok_path))
        model = load_model(args["path"], device)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if sp.GetPieceSize() > model.cfg.vocab_size:
        fail(f"{tok_path} has {sp.GetPieceSize()} pieces but the model's vocab is {model.cfg.vocab_size}; "
             f"pass the tokenizer the run was trained with")
    prompt_ids = [sp.bos_id()] + sp.Encode(args.get("prompt", ""))
    ids = torch.tensor([prompt_ids] * args.get("num_samples", 1), device=device)
    torch.manual_seed(args.get("seed", 0))
    out = generate(model, ids, args.get("max_new_tokens", 100), temperature=args.get("temperature", 0.8),
                   top_k=args.get("top_k", 50), top_p=args.get("top_p", 0.95), eos_id=sp.eos_id())
    for i, row in enumerate(out.tolist()):
        if i:
            print("-" * 40)
        # Stop at the first EOS of each sample (a batch runs until all samples end).
        row = row[1:]
        print(sp.Decode(row[: row.index(sp.eos_id())] if sp.eos_id() in row else row))


if __name__ == "__main__":
    main(sys.argv[1:])
