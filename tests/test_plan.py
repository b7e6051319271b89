"""The memory and throughput planner (train/plan.py, train/plan_tp.py, launch/plan.py), in-process: its
command line is main(argv), so no test pays for a new interpreter."""

import pytest

from launch.plan import main, memory_rows, throughput_rows
from model import preset
from train.memory import estimate_memory
from train.plan import Hardware, Layout, dp_seconds, recommend
from train.plan_tp import tp_bytes


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """main(argv)'s exit status (a SystemExit's too), stdout and stderr."""
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_validation_against_measured_and_published_figures(capsys):
    """Memory within 10% of this trainer's H100 peaks, throughput within 15% of torchtitan's published
    figures, among them the two 2D ones the issue names (Llama 3.1 70B FSDP 32 x TP 8 float8, with and
    without async TP; 405B FSDP 16 x TP 8 bf16)."""
    assert all(abs(planned / measured - 1) <= 0.10 for _, planned, measured in memory_rows())
    rows = throughput_rows()
    off = [(what, planned, published) for what, planned, published in rows if abs(planned / published - 1) > 0.15]
    assert not off, off
    named = {(published, what.split(" (")[0]) for what, _, published in rows}
    assert {(829, "70b 256 GPUs"), (876, "70b 256 GPUs"), (109, "405b 128 GPUs")} <= named
    code, out, _ = run(capsys, "--validate")
    assert code == 0 and out.count(" ok") == len(rows) + 4 and "OFF" not in out


def test_tensor_parallelism_divides_state_activations_and_fsdp_traffic():
    cfg, tokens = preset("70b"), 2 * 8192
    one, eight = (estimate_memory(cfg, 2, 8192, 16, "full", 2, tp=tp) for tp in (1, 8))
    for kind in ("params", "optimizer"):  # fp32 state, split over tp before FSDP shards it over 16
        assert eight[kind] == pytest.approx(one[kind] / 8)
    # Full AC keeps each block's sequence-parallel input: 1/8 of it, plus one recomputing block's set.
    assert one["activations"] / 8 < eight["activations"] < one["activations"] / 4
    hw = Hardware()
    # Both FSDP groups span nodes (16 x 8 and 16 ranks): each rank gathers and reduces 1/tp of the weights.
    assert dp_seconds(cfg, Layout(1, 16, 8), hw) == pytest.approx(dp_seconds(cfg, Layout(1, 16, 1), hw) / 8)
    # Per block 2 all-gathers + 2 reduce-scatters forward, as many backward, the forward's again under full
    # AC: 12 bf16 collectives of (tokens, dim), plus 4 outside the blocks (embedding, loss); ring share 7/8.
    expected = (cfg.n_layers * 12 + 4) * 2 * tokens * cfg.dim * 7 / 8
    assert tp_bytes(cfg, tokens, "full", 2, 8, float8=False) == pytest.approx(expected)
    assert tp_bytes(cfg, tokens, "none", 2, 8, float8=False) < expected and tp_bytes(cfg, tokens, "full", 2, 1,
                                                                                        float8=False) == 0


def test_the_recommender_picks_tensor_parallelism_for_70b_on_64_gpus():
    best, plans = recommend(preset("70b"), 64, 8192, Hardware(), compile=True)
    assert best["layout"].tp > 1 and best["fits"]
    assert all(best["tokens_per_s_per_gpu"] > p["tokens_per_s_per_gpu"] for p in plans if p["layout"].tp == 1)
    # A global batch cap of 8 sequences leaves only the layouts with 8 data-parallel ranks: tp 8.
    best, plans = recommend(preset("70b"), 64, 8192, Hardware(), max_global_tokens=8 * 8192, compile=True)
    assert plans and all(p["min_global_tokens"] <= 8 * 8192 and p["layout"].tp == 8 for p in plans)


def test_plan_prints_assumptions_and_a_layout(capsys):
    code, out, _ = run(capsys, "+conf=70b", "gpus=64", "tp=1")
    assert code == 0, out
    assert "assumptions:" in out and "TP (sequence parallel)" in out and "GB/s" in out
    assert "on 64 GPUs (dp_shard 64)" in out  # tp=1 overrides the config's parallel.tp
    assert "recommendation: dp_shard 8 x tp 8 -- parallel.tp=8" in out


def test_a_model_too_large_for_its_gpus_is_flagged(capsys):
    code, out, _ = run(capsys, "+conf=405b", "gpus=8")
    assert code == 1
    assert "DOES NOT FIT" in out and "nothing fits on 8 GPUs" in out


def test_tp_across_nodes_warns(capsys):
    code, out, err = run(capsys, "+conf=70b", "gpus=64", "tp=8", "gpus_per_node=4")
    assert code == 0 and "recommendation:" in out
    assert err.startswith("warning: tp=8 is larger than the 4 GPUs of a node") and err.count("\n") == 1


@pytest.mark.parametrize("args, names", [
    (("gpus=abc",), "gpus takes an integer"), (("gpus=0",), "gpus must be > 0"),
    (("overlap=1.5",), "overlap must be within"), (("tp_exposed=-0.1",), "tp_exposed must be within [0, 1]"),
    (("+conf=nope",), "no conf/nope.yaml"), (("model.dimm=3",), "did you mean 'model.dim'"),
    (("model.dim=63",), "divisible by model.n_heads"), (("data.seq_len=0",), "data.seq_len=0"),
    (("gpus=64", "tp=3"), "tp=3 must divide gpus=64"), (("gpus=64", "tp=0"), "tp must be > 0"),
    (("+conf=70b", "gpus=64", "tp=16"), "tp=16 must divide model.n_kv_heads=8"),
    (("gpus=64", "tp=8", "dp_replicate=3"), "dp_replicate=3 x tp=8 must divide gpus=64"),
])
def test_bad_input_is_one_line(args, names, capsys):
    code, out, err = run(capsys, *args)
    assert code == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and names in err, err


def test_help_prints_usage(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "python launch/plan.py +conf=70b gpus=64" in out
