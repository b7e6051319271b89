"""Plan a run's per-GPU memory and throughput before paying for it:

    python launch/plan.py +conf=70b gpus=64 [micro_batch=1] [efficiency=0.554] ...
    python launch/plan.py --validate     # the planner against measured and published figures

Planner keys (gpus, micro_batch, and any field of train.plan.Hardware) are key=value; the
rest (+conf=..., model.*, data.seq_len=...) are the trainer's own overrides.
"""

import sys
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.errors import HydraException  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from launch.cli_args import fail  # noqa: E402
from model import preset  # noqa: E402
from train import config  # noqa: E402
from train.plan import Hardware, plan, recommend  # noqa: E402

PLAN_KEYS = {"gpus", "micro_batch"} | {f.name for f in fields(Hardware)}
FRACTIONS = ("efficiency", "no_compile_factor", "power_factor", "overlap")  # Hardware fields at most 1


def planner_values(words: list[str]) -> tuple[int, int | None, Hardware]:
    """gpus, micro batch (None: the config's) and Hardware from the planner's key=value words;
    a bad value ends the program with a one-line error naming it."""
    types = {"gpus": int, "micro_batch": int} | {f.name: f.type for f in fields(Hardware)}
    values = {}
    for word in words:
        key, raw = word.split("=", 1)
        try:
            values[key] = types[key](raw)
        except ValueError:
            fail(f"{word}: {key} takes {'an integer' if types[key] is int else 'a number'}")
        v = values[key]
        if key in FRACTIONS and not (0 <= v <= 1 if key == "overlap" else 0 < v <= 1):
            fail(f"{word}: {key} must be within {'[0, 1]' if key == 'overlap' else '(0, 1]'}")
        if key not in FRACTIONS and not v > 0:
            fail(f"{word}: {key} must be > 0")
    hw = Hardware(**{k: v for k, v in values.items() if k not in ("gpus", "micro_batch")})
    return values.get("gpus", 8), values.get("micro_batch"), hw


def show(name: str, model_cfg, gpus: int, seq_len: int, micro_batch: int, ac: str, hw: Hardware) -> dict:
    p = plan(model_cfg, gpus, micro_batch, seq_len, ac, hw)
    parts = ", ".join(f"{k} {v:.1f}" for k, v in p["memory_gib"].items())
    print(f"{name} on {gpus} GPUs, micro batch {micro_batch} x {seq_len}, AC {ac}: {p['total_gib']:.1f} GiB per GPU "
          f"({parts}){'' if p['fits'] else ' -- DOES NOT FIT'}; {p['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU "
          f"(compute {p['compute_s']:.2f} s, FSDP communication {p['comm_s']:.2f} s per micro-batch)")
    return p


def validate() -> int:
    """Memory against this trainer's H100 peaks; throughput against torchtitan's published figures."""
    bad = 0
    print("memory, measured on one H100 (torch 2.11, compile, this trainer, residual stream still fp32):")
    for name, mb, seq, ac, measured in (("tt_1b", 2, 8192, "none", 42.6), ("tt_1b", 8, 2048, "none", 42.6),
                                        ("tt_8b_l8", 1, 8192, "none", 50.9), ("tt_8b_l8", 1, 8192, "selective", 44.9)):
        est = plan(preset(name), 1, mb, seq, ac, Hardware())["total_gib"]
        ok = abs(est / measured - 1) <= 0.10
        bad += not ok
        print(f"  {name} {mb}x{seq} AC {ac}: planned {est:.1f} GiB, measured {measured} GiB "
              f"({est / measured - 1:+.1%}) {'ok' if ok else 'OFF'}")
    # torchtitan benchmarks/llama3_h100_202412_torchtitan.md: Llama 3.1 8B, seq 8192, local batch 2,
    # FSDP, selective AC, 96 GB H100s (HBM2e) at 500 W. Their single-GPU efficiency is torchtitan's
    # own, measured on our H100: 8B_L8 selective compile 47.1% MFU.
    hw = Hardware(efficiency=0.471, power_factor=0.8)
    print(f"throughput vs torchtitan's published 8B figures (efficiency {hw.efficiency}, power factor "
          f"{hw.power_factor} for 500 W):")
    for gpus, compile, published in ((8, False, 5762), (8, True, 6667), (128, False, 5605), (128, True, 6514)):
        est = plan(preset("8b"), gpus, 2, 8192, "selective", hw, compile=compile)["tokens_per_s_per_gpu"]
        ok = abs(est / published - 1) <= 0.15
        bad += not ok
        print(f"  {gpus} GPUs, compile={compile}: planned {est:,.0f}, published {published:,} tokens/s per GPU "
              f"({est / published - 1:+.1%}) {'ok' if ok else 'OFF'}")
    return 1 if bad else 0


def trainer_config(overrides: list[str]):
    """The trainer's config and the model shape it names; a bad override ends the program in one line."""
    problem = config.check_overrides(overrides, ROOT / "conf")
    if problem:
        fail(problem)
    config.register()
    try:
        with initialize_config_dir(config_dir=str(ROOT), version_base="1.3"):
            cfg = OmegaConf.to_object(compose("pretrain", overrides=overrides))
        shape = {k: v for k, v in vars(cfg.model).items()
                 if k not in ("preset", "vocab_from_tokenizer") and v is not None}
        model_cfg = preset(cfg.model.preset, **shape)
    except (HydraException, ValueError) as e:  # an override's syntax, an unknown preset, a bad shape
        fail(str(e).strip().splitlines()[0])
    if cfg.data.seq_len < 1:
        fail(f"data.seq_len={cfg.data.seq_len} must be >= 1")
    return cfg, model_cfg


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip())
        return 0
    if argv == ["--validate"]:
        return validate()
    ours = [a for a in argv if a.split("=", 1)[0] in PLAN_KEYS]
    gpus, mb, hw = planner_values(ours)
    cfg, model_cfg = trainer_config([a for a in argv if a not in ours])
    mb = mb or cfg.micro_batch_size
    print(f"assumptions: {hw.peak_tflops:.0f} TFLOP/s peak x {hw.efficiency:.1%} efficiency x {hw.power_factor} power, "
          f"{hw.memory_gib} GiB per GPU, {hw.gpus_per_node} GPUs per node, FSDP bandwidth {hw.intra_node_gbs:.0f} GB/s "
          f"in a node / {hw.inter_node_gbs:.0f} GB/s per GPU across nodes, {hw.overlap:.0%} of communication "
          f"hidden under compute; memory calibrated on one H100")
    for mode in ("none", "selective", "full"):
        show(cfg.model.preset, model_cfg, gpus, cfg.data.seq_len, mb, mode, hw)
    best = recommend(model_cfg, gpus, cfg.data.seq_len, hw)
    if best is None:
        print(f"recommendation: nothing fits on {gpus} GPUs; add GPUs or shorten data.seq_len")
        return 1
    print(f"recommendation: micro_batch_size={best['micro_batch']} parallel.activation_checkpointing={best['ac']} "
          f"-> {best['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, {best['total_gib']:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
