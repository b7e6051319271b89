"""The memory and throughput planner (train/planner/: plan.py, plan_tp.py, plan_pp.py; launch/plan.py),
in-process: its command line is main(argv), so no test pays for a new interpreter."""

import re
import signal

import pytest

import statistics

from launch.plan import CALIBRATION, HELD_OUT, held_out_rows, main, memory_rows, throughput_rows
from model import flops_per_token, num_params, preset
from train.planner.memory import estimate_memory, estimate_stage_memory, stage_params
from train.planner.plan import (
    Hardware,
    Layout,
    best_for_layout,
    dp_seconds,
    every_other_mm_share,
    gemm_share,
    layouts,
    plan,
    recommend,
    ring_latency,
    tp_async_exposed,
)
from train.planner.plan_cp import cp_bytes, cp_seconds
from train.planner.plan_pp import (
    Pipeline,
    bubble_slots,
    in_flight,
    p2p_seconds,
    pipeline_problem,
    rank_stages,
    stage_layers,
)
from train.planner.plan_tp import tp_bytes


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
    figures, among them the 2D ones the TP issue names (Llama 3.1 70B FSDP 32 x TP 8 float8, with and
    without async TP; 405B FSDP 16 x TP 8 bf16) and the 3D ones the PP issue names (405B FSDP 8 x TP 8 x
    PP 8, float8 + async TP: 1F1B 100, Interleaved1F1B 128 tokens/s per GPU)."""
    assert all(abs(planned / measured - 1) <= 0.10 for _, planned, measured in memory_rows())
    rows = throughput_rows()
    off = [(what, planned, published) for what, planned, published in rows if abs(planned / published - 1) > 0.15]
    assert not off, off
    named = {(published, what.split(" (")[0]) for what, _, published in rows}
    assert {(829, "70b 256 GPUs"), (876, "70b 256 GPUs"), (109, "405b 128 GPUs")} <= named
    assert {(100, "405b 512 GPUs"), (128, "405b 512 GPUs")} <= named
    code, out, _ = run(capsys, "--validate")
    assert code == 0 and out.count(" ok") == len(rows) + 4 and "OFF" not in out


def test_validate_reports_a_held_out_set_apart_and_planning_quotes_its_error(capsys):
    """Calibration and held-out published runs are disjoint, each printed with its source and the set's summary
    (median and worst |error|, from its rows); every recommendation quotes the held-out median and worst."""
    def key(r):
        return r.source, r.model, r.layout, r.micro_batch, tuple(sorted(map(str, r.options.items())))
    assert not {key(r) for r in CALIBRATION} & {key(r) for r in HELD_OUT} and len(HELD_OUT) >= 6
    sources = {r.source.split(" (")[0] for r in HELD_OUT}
    assert {"Llama 3 paper", "torchtitan benchmarks/asyncTP_llama3_h100_2025-06_torchtitan.md"} <= sources
    errors = [abs(planned / published - 1) for _, planned, published in held_out_rows()]
    code, out, _ = run(capsys, "--validate")
    held = out.split("held-out set")[1]
    assert held.count("source: ") == len(HELD_OUT)
    assert out.split("held-out set")[0].count("source: ") == len(CALIBRATION)
    assert f"median |err| {statistics.median(errors):.1%}, worst {max(errors):.1%}" in held
    code, out, _ = run(capsys, "+conf=8b", "gpus=8")
    assert f"expect ±{statistics.median(errors):.0%} (held-out median |err|, worst {max(errors):.0%}" in answer(out)


def test_torchtitans_selective_ac_recomputes_every_other_matmul_counted_once():
    """torchtitan's op-level selective AC recomputes a block's 2nd, 4th and 6th matmuls (k, o, w3): 36-37% of its
    matmul FLOPs. From torchtitan's no-AC efficiency on our H100 (51.4% MFU) that predicts its selective run's
    measured 47.1% (8B layers x 8, 1 x 8192) within 2%; and an efficiency measured with this trainer's selective
    AC on is what a selective plan reaches, its recompute not counted a second time."""
    for name in ("8b", "70b", "405b"):
        assert 0.35 < every_other_mm_share(preset(name)) < 0.38
    cfg, tokens = preset("tt_8b_l8"), 8192

    def mfu(p, hw):
        return p["tokens_per_s_per_gpu"] * flops_per_token(cfg, tokens) / (hw.peak_tflops * 1e12)
    tt = Hardware(efficiency=0.514, efficiency_recompute=0.0)
    assert mfu(plan(cfg, Layout(), 1, tokens, "selective", tt, sac="torchtitan"), tt) == pytest.approx(0.471, rel=0.02)
    ours = Hardware()
    assert mfu(plan(cfg, Layout(), 1, tokens, "selective", ours), ours) == pytest.approx(ours.efficiency, rel=1e-3)


def test_collectives_pay_a_latency_per_ring_step_more_across_nodes():
    """NCCL's ring model: base + a step per rank, network steps slower; FSDP pays it per block, so 1,024-way FSDP
    of 405B over as many nodes waits seconds per micro-batch that its bytes alone do not."""
    hw = Hardware()
    assert ring_latency(8, 1, hw) == pytest.approx(1e-6 * (8.4 + 7 * 3.4))  # one node's 8 GPUs
    assert ring_latency(16, 8, hw) == pytest.approx(1e-6 * (8.4 + 15 * 14.0))  # a GPU on each of 16 nodes
    assert ring_latency(16, 1, hw) == pytest.approx(1e-6 * (8.4 + 14 * 3.4 + 14.0))  # 2 nodes of 8
    cfg, wide = preset("405b"), Layout(1, 1024, 8)
    no_latency = Hardware(collective_base_us=0, intra_node_latency_us=0, inter_node_latency_us=0)
    added = dp_seconds(cfg, wide, hw) - dp_seconds(cfg, wide, no_latency)
    assert added == pytest.approx((cfg.n_layers + 1) * 3 * 1e-6 * (8.4 + 1023 * 14.0))


def test_small_gemms_of_narrow_tp_shards_run_at_a_lower_share_of_peak():
    """XLA's published H100 GEMM table (GEMM_CURVE): a 4-GFLOP GEMM runs at 44% of the best rate, 128 GFLOP and more at
    all of it. 8B at tp 8 on one 8,192-token sequence has 8.6-GFLOP k/v shards: per token its compute is slower than
    on 12 sequences, whose GEMMs are 12 times larger."""
    assert gemm_share(4) == pytest.approx(0.44) and gemm_share(128) == gemm_share(4096) == 1.0
    assert gemm_share(1) < gemm_share(2) < gemm_share(8) < gemm_share(16)
    hw, cfg = Hardware(), preset("8b")
    one, twelve = (plan(cfg, Layout(1, 8, 8), mb, 8192, "selective", hw)["compute_s"] / mb for mb in (1, 12))
    assert one > 1.02 * twelve


def test_async_tp_hides_no_more_than_the_matmul_each_collective_feeds():
    """Async TP overlaps each collective with its own matmul: 70B's wide ones hide all but the first of tp pieces;
    8B's q/k/v and o at tp 8 are too short to hide theirs, and float8's faster matmuls hide less."""
    hw = Hardware(efficiency=0.514, efficiency_recompute=0.0, power_factor=0.8)
    wide, narrow = (tp_async_exposed(preset(n), 8, hw, True, False) for n in ("70b", "8b"))
    assert wide == pytest.approx(hw.async_tp_exposed, rel=0.05) and narrow > 1.5 * hw.async_tp_exposed
    assert tp_async_exposed(preset("8b"), 8, hw, True, True) > narrow


def test_tensor_parallelism_divides_state_activations_and_fsdp_traffic():
    cfg, tokens = preset("70b"), 2 * 8192
    one, eight = (estimate_memory(cfg, 2, 8192, 16, "full", 2, tp=tp) for tp in (1, 8))
    for kind in ("params", "optimizer"):  # fp32 state, split over tp before FSDP shards it over 16
        assert eight[kind] == pytest.approx(one[kind] / 8)
    # Full AC keeps each block's sequence-parallel input and the final norm's: 1/8 of them. The recomputing block's
    # set takes turns with the loss's logits (memory.py estimate_memory "recompute"): no more than at tp 1.
    assert eight["activations"] == pytest.approx(one["activations"] / 8)
    assert eight["recompute"] <= one["recompute"]
    hw = Hardware(collective_base_us=0, intra_node_latency_us=0, inter_node_latency_us=0)  # bytes alone
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


def answer(out: str) -> str:
    """The recommendation line of llm-plan's output."""
    return next(line for line in out.splitlines() if line.startswith("recommendation: "))


def test_plan_prints_assumptions_and_a_layout(capsys):
    code, out, _ = run(capsys, "+conf=70b", "gpus=64", "tp=1")
    assert code == 0, out
    assert "assumptions:" in out and "TP (sequence parallel)" in out and "GB/s" in out and "PP (pp outermost" in out
    assert out.index("recommendation: ") < out.index("assumptions:")  # the answer first, then what it assumes
    assert "on 64 GPUs (dp_shard 64)" in out  # tp=1 overrides the config's parallel.tp
    # The recommendation (pipelined here, see test_the_recommender_weighs_pipeline_layouts) keeps conf/70b.yaml's
    # 512 sequences per step.
    assert "recommendation: " in out and "parallel.pp_schedule=" in out.split("recommendation: ")[1]
    assert "global_batch_size=512" in out.split("recommendation: ")[1]
    assert "best without PP (-" in out  # what the trainer runs today, and how much slower


def test_plan_of_a_pipelined_layout(capsys):
    # conf/70b.yaml: micro batch 2, 512 sequences per step; 64 GPUs as pp 2 x tp 8 leave 4 data-parallel
    # ranks, so each pipeline runs 512 / (4 x 2) = 64 micro-batches a step.
    code, out, _ = run(capsys, "+conf=70b", "gpus=64", "tp=8", "pp=2", "pp_schedule=Interleaved1F1B")
    assert code == 0, out
    assert "on 64 GPUs (dp_shard 4 x tp 8 x pp 2, Interleaved1F1B, 64 micro-batches, 2 stages per rank)" in out
    assert "bubble" in out and "P2P" in out and "GiB by pipeline rank: rank 0" in out


def test_a_model_too_large_for_its_gpus_is_flagged(capsys):
    code, out, _ = run(capsys, "+conf=405b", "gpus=8", "pp=1")  # the preset's tp 8 on one node
    assert code == 1
    assert "DOES NOT FIT" in out and "nothing fits on 8 GPUs" in out


def test_a_billion_gpus_are_planned_at_once_and_blamed_on_the_step_size(capsys):
    """The layouts come from the GPU count's divisors, not from every number up to it (minutes); nothing fits
    because one sequence per data-parallel rank is more than max_global_tokens, and the answer says so."""
    def too_slow(*_):
        pytest.fail("planning 1,000,000,000 GPUs took over 20 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(20)
    try:
        code, out, _ = run(capsys, "+conf=8b", "gpus=1000000000")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    said = answer(out)
    # The most model-parallel layout: tp 8 (a node) x pp 32 (conf/8b.yaml's layers) leaves 10**9 / 256 ranks.
    assert code == 1 and f"nothing fits on 1,000,000,000 GPUs: {10**9 // 256:,} or more data-parallel ranks" in said
    assert "exceed max_global_tokens=16,777,216" in said and "use fewer GPUs" in said
    assert "add GPUs" not in said
    code, _, err = run(capsys, "+conf=8b", f"gpus={2**40 + 1}")
    assert code == 1 and "gpus must be at most 2**40" in err


@pytest.mark.parametrize("gpus", [3, 12])
def test_a_gpu_count_that_does_not_divide_the_global_batch_is_named_and_planned_with_one_that_does(gpus, capsys):
    """conf/8b.yaml's 512 sequences per step do not split over the data-parallel ranks of 3 or 12 GPUs (12 as dp 12,
    dp 6 x tp 2 or dp 3 x tp 4): the answer says that, not max_global_tokens or more GPUs, plans the nearest global
    batch that every layout takes, and its keys set that batch, which the trainer then takes as it is."""
    code, out, err = run(capsys, "+conf=8b", f"gpus={gpus}")
    assert code == 0, out
    assert f"warning: global_batch_size=512 is not a multiple of data-parallel ranks x micro batch = {gpus}" in err
    cause = next(line for line in out.splitlines() if line.startswith("global_batch_size=512 sequences"))
    assert f"do not divide over the data-parallel ranks of {gpus} GPUs" in cause and "add GPUs" not in out
    proposed = [int(g) for g in re.findall(r"global_batch_size=(\d+)", cause)[1:]]
    assert len(proposed) == 2 and all(g % gpus == 0 and abs(g - 512) < gpus for g in proposed), cause
    assert f"global_batch_size={proposed[0]}" in answer(out)
    code, out, err = run(capsys, "+conf=8b", f"gpus={gpus}", f"global_batch_size={proposed[0]}")
    assert code == 0 and "global_batch_size" not in answer(out) and err == ""


def test_the_presets_layout_is_a_starting_point_unless_pinned(capsys):
    """conf/405b.yaml's tp 8 x pp 8 does not divide 16 GPUs: every layout of 16 GPUs is planned instead. None fits a
    405B, and the answer names the GPU count that does; a 16-layer 405B-shape fits, and is recommended. tp=/pp= on
    the command line pin the layout, which is then refused in one line."""
    code, out, err = run(capsys, "+conf=405b", "gpus=16")
    assert code == 1 and err == ""
    assert out.startswith("the config's layout (tp 8 x pp 8 = 64 GPUs) does not divide 16 GPUs: planning every")
    said = answer(out)
    assert "nothing fits on 16 GPUs: every layout needs more than 79.2 GiB per GPU; add GPUs" in said
    more = int(re.search(r"gpus=([\d,]+) is the first that fits", said).group(1).replace(",", ""))
    assert run(capsys, "+conf=405b", f"gpus={more}")[0] == 0 and run(capsys, "+conf=405b", f"gpus={more // 2}")[0] == 1
    code, out, _ = run(capsys, "+conf=405b", "gpus=16", "model.n_layers=16")
    assert code == 0, out
    assert "parallel.pp=" in answer(out)  # the preset's pp 8 would stay otherwise
    for pinned in ("tp=8", "parallel.pp=8"):
        code, out, err = run(capsys, "+conf=405b", "gpus=16", pinned)
        assert code == 1 and out == "" and err.startswith("error: tp=8 x pp=8 must divide gpus=16"), err


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
    (("gpus=64", "tp=8", "pp=3"), "tp=8 x pp=3 must divide gpus=64"),
    (("+conf=70b", "gpus=64", "pp=4", "pp_schedule=Foo"), "pp_schedule=Foo is not one of 1F1B, Interleaved1F1B"),
    (("+conf=70b", "gpus=64", "pp=4", "pp_schedule=ZBVZeroBubble"), "refuses compiled stages"),
    (("+conf=70b", "gpus=64", "pp=4", "micro_batch=3"), "global_batch_size=512 must be a multiple of"),
    # 512 / (1 x 128) = 4 micro-batches for pp 8: a micro batch of 64, or 1,024 sequences, give 8.
    (("+conf=70b", "gpus=64", "tp=8", "pp=8", "micro_batch=128"), "set micro_batch=64 or global_batch_size=1024"),
    (("+conf=70b", "gpus=64", "tp=8", "pp=8", "pp_microbatches=4"), "use a multiple of pp=8"),
    (("+conf=8b", "gpus=8", "--validate"), "--validate checks the planner against fixed"),  # not Hydra's lexer error
    (("+conf=8b", "--verbose"), "--verbose: llm-plan takes key=value words, --validate (alone) or --help"),
    (("+conf=8b", "gpus=8", "pp=2", "parallel.cpu_offload=true"), "parallel.cpu_offload=true does not run under"),
    (("+conf=8b", "gpus=8", "cp=3"), "cp=3 x tp=1 must divide gpus=8"),
    (("+conf=8b", "gpus=8", "cp=8", "data.seq_len=8200"), "must be divisible by 2 x cp x tp = 16"),
])
def test_bad_input_is_one_line(args, names, capsys):
    code, out, err = run(capsys, *args)
    assert code == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and names in err, err


@pytest.mark.parametrize("pipe, pp, names", [
    (Pipeline("1F1B", 8, 2), 4, "1F1B takes virtual_stages=1"), (Pipeline("ZBVZeroBubble", 8, 4), 4, "=2"),
    (Pipeline("Interleaved1F1B", 8, 1), 4, "virtual_stages >= 2"),
    (Pipeline("1F1B", 2), 4, "2 micro-batches per step, fewer than pp=4, which 1F1B needs"),
    (Pipeline("Interleaved1F1B", 9, 2), 4, "9 micro-batches per step, not a multiple of 2"),  # torch: rounds = 9 // 4
    (Pipeline("Interleaved1F1B", 64, 2), 64, "pp=64 x virtual_stages=2 stages exceed model.n_layers=80"),
])
def test_pipelines_torch_refuses(pipe, pp, names):
    assert names in pipeline_problem(pipe, pp, 80)
    assert pipeline_problem(Pipeline("GPipe", 1), 4, 80) is None  # GPipe takes any number of micro-batches


def test_help_prints_usage(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "llm-plan +conf=70b gpus=64" in out


def test_pipeline_bubble_of_each_schedule():
    p, m = 8, 8
    # 1F1B and GPipe idle p - 1 micro-batch slots, a share (p-1)/(m+p-1) of the step (Narayanan et al. 2021);
    # interleaving v stages per rank divides the idle slots by v.
    for schedule, v, slots in (("1F1B", 1, p - 1), ("GPipe", 1, p - 1), ("Interleaved1F1B", 2, (p - 1) / 2),
                               ("Interleaved1F1B", 4, (p - 1) / 4)):
        assert bubble_slots(Pipeline(schedule, m, v), p, recompute=1.0) == pytest.approx(slots)
    # Zero bubble (Qi et al. 2023): with T_F = T_W = 1 and T_B = 1 + recompute, ZB-V idles
    # (p-1)(T_F + T_B - 2 T_W) and the interleaved ZB-H1 (p-1)(T_F + T_B - T_W)/v, in units of T_F + T_B + T_W.
    assert bubble_slots(Pipeline("ZBVZeroBubble", m, 2), p, recompute=0.0) == 0
    assert bubble_slots(Pipeline("ZBVZeroBubble", m, 2), p, recompute=1.0) == pytest.approx((p - 1) * 1 / 4)
    assert bubble_slots(Pipeline("InterleavedZeroBubble", m, 2), p, 0.0) == pytest.approx((p - 1) * 1 / 3 / 2)
    hw, layout = Hardware(), Layout(1, 8, 8, 8)
    one = plan(preset("405b"), layout, 4, 8192, "full", hw, pipeline=Pipeline("1F1B", m))
    two = plan(preset("405b"), layout, 4, 8192, "full", hw, pipeline=Pipeline("Interleaved1F1B", m, 2))
    assert one["bubble"] == pytest.approx((p - 1) / (m + p - 1))
    assert two["bubble"] == pytest.approx((p - 1) / 2 / (m + (p - 1) / 2))
    assert two["tokens_per_s_per_gpu"] > one["tokens_per_s_per_gpu"]


def test_pipeline_stages_memory_and_traffic():
    cfg = preset("405b")  # 126 layers
    # torchtitan's split: 126 // 8 = 15 each, the 6 left over one each to stages 1..6.
    assert stage_layers(126, 8) == [15, 16, 16, 16, 16, 16, 16, 15]
    assert stage_layers(126, 16) == [7] + [8] * 14 + [7]
    assert rank_stages(0, 8, Pipeline("Interleaved1F1B", 8, 2)) == [0, 8]
    assert rank_stages(0, 8, Pipeline("ZBVZeroBubble", 8, 2)) == [0, 15]
    # 1F1B: the first stage runs pp forwards before its first backward, the last one; GPipe keeps all m.
    assert [in_flight(Pipeline("1F1B", 16), 8, r) for r in (0, 7)] == [8, 1]
    assert in_flight(Pipeline("GPipe", 16), 8, 3) == 16
    tp, dp, mb, seq = 8, 8, 4, 8192
    first, last = (estimate_stage_memory(cfg, mb, seq, dp, "full", 2, 2, tp, 15, k, k == 8, k == 1) for k in (8, 1))
    # Full AC keeps each block's bf16 (tokens x dim)/tp input per micro-batch in flight.
    kept = 15 * mb * seq * cfg.dim * 2 / tp
    assert first["activations"] - last["activations"] == pytest.approx(7 * kept)
    # Per rank: its layers (and the embedding on the first stage) in fp32 sharded over dp with their AdamW
    # moments, gathered in bf16 and with whole fp32 gradients all step.
    layer = (num_params(cfg) - cfg.dim - 2 * cfg.vocab_size * cfg.dim) / cfg.n_layers
    n = (15 * layer + cfg.vocab_size * cfg.dim) / tp
    assert stage_params(cfg, 15, True, False) / tp == pytest.approx(n)
    assert (first["params"], first["optimizer"]) == pytest.approx((4 * n / dp, 8 * n / dp))
    assert (first["weight_copies"], first["grads"]) == pytest.approx((2 * n, 4 * n))
    assert "cross_entropy" in last and "cross_entropy" not in first
    # Each boundary carries a micro-batch's bf16 activations forward and their gradient back, each TP rank
    # its 1/tp; dp x tp = 64 GPUs apart, so over the network.
    layout, pipe, hw = Layout(1, dp, tp, 8), Pipeline("Interleaved1F1B", 8, 2), Hardware()
    sent, exposed = p2p_seconds(cfg, layout, pipe, mb * seq, hw)
    boundary = mb * seq * cfg.dim * 2 / tp
    assert sent == pytest.approx(2 * 8 * 2 * boundary)
    assert exposed == pytest.approx(2 * (8 * 2 - 1) * boundary / (hw.inter_node_gbs * 1e9))


def test_the_recommender_weighs_pipeline_layouts():
    best, plans = recommend(preset("70b"), 64, 8192, Hardware(), global_batch=512, compile=True)
    piped = [p for p in plans if p["pipeline"]]
    assert piped and {p["layout"].pp for p in piped} >= {2, 4, 8}
    # Micro-batches replace gradient accumulation: every pipeline runs the whole global batch; a layout
    # without PP must divide it.
    assert all(p["min_global_tokens"] == 512 * 8192 for p in piped)
    assert all(512 * 8192 % p["min_global_tokens"] == 0 for p in plans if not p["pipeline"])
    assert all(not p["compile"] for p in piped if "ZeroBubble" in p["pipeline"].schedule)  # torch refuses it
    # FSDP gathers and reduces once a step under PP, not every micro-batch: at 64 GPUs PP wins.
    flat = max(p["tokens_per_s_per_gpu"] for p in plans if not p["pipeline"])
    assert best["pipeline"] and best["tokens_per_s_per_gpu"] > 1.01 * flat


def test_cpu_offload_moves_the_fp32_state_to_the_host():
    """8B on one GPU, 1 x 8192, full AC. By hand: the root (embedding and head, 128,256 x 4,096 each, and the final
    norm) and two of the 32 blocks are gathered in bf16, their gradients in bf16 and fp32; the host holds 16 bytes
    a parameter; PCIe carries 8 bytes a parameter down (forward and backward) per micro-batch."""
    cfg, hw = preset("8b"), Hardware()
    root = 2 * 128256 * 4096 + 4096
    block = (num_params(cfg) - root) / 32
    gathered = 2 * block + root
    p = plan(cfg, Layout(), 1, 8192, "full", hw, cpu_offload=True, accumulation=4)
    assert p["memory_gib"]["weight_copies"] == pytest.approx(2 * gathered / 2**30)
    assert p["memory_gib"]["grads"] == pytest.approx((2 + 4) * gathered / 2**30)
    assert "params" not in p["memory_gib"] and "optimizer" not in p["memory_gib"]
    assert p["host_gib"] == pytest.approx(16 * num_params(cfg) / 2**30)
    assert p["pcie_s"] == pytest.approx(8 * num_params(cfg) / 50e9)
    # The CPU's AdamW: 28 bytes a parameter at 100 GB/s, once per 4 micro-batches; the adds of 3 of them: a
    # blocking 4-byte copy up and 12 bytes on the host.
    adam = 28 * num_params(cfg) / 100e9
    assert p["optimizer_s"] == pytest.approx(adam)
    assert p["host_s"] == pytest.approx((adam + 3 * (4 / 50e9 + 12 / 100e9) * num_params(cfg)) / 4)
    plain = plan(cfg, Layout(), 1, 8192, "full", hw)
    assert plain["total_gib"] > hw.memory_gib > p["total_gib"]  # 16 bytes a parameter alone are 120 GiB
    assert p["tokens_per_s_per_gpu"] < plain["tokens_per_s_per_gpu"] and 0 < p["offload_share"] < 1


def test_an_8b_on_one_gpu_fits_only_with_cpu_offload(capsys):
    code, out, _ = run(capsys, "+conf=8b", "gpus=1")
    assert code == 1 and "nothing fits on 1 GPUs" in out and "or set parallel.cpu_offload=true" in out
    code, out, _ = run(capsys, "+conf=8b", "gpus=1", "parallel.cpu_offload=true")
    full_ac = [line for line in out.splitlines() if line.startswith("8b on 1 GPUs") and "AC full" in line]
    assert code == 0 and full_ac and "DOES NOT FIT" not in full_ac[0], out
    assert "parallel.cpu_offload=true ->" in out and "GiB of host memory per GPU" in out and "of the step time" in out


def test_context_parallelism_divides_compute_and_adds_the_kv_collectives():
    """8B at 131,072 tokens on one node as cp 8: each GPU computes 1/8 of the micro-batch (2 x cp chunks balance the
    causal work), attention as the causal kernels under flex's BlockMask (twice over with SDPA's dense mask,
    cp_mask_attention=2), and per block all-gathers its
    bf16 K and V (8 KV heads x 128) and reduce-scatters their gradients, gathering again when AC recomputes it;
    ring share 7/8, NVLink's 350 GB/s within the node, the network's 50 GB/s once cp x tp spans nodes."""
    cfg, T = preset("8b"), 131072
    hw = Hardware()
    gathered = 2 * T * 8 * 128 * 2  # K and V of one block, bf16
    assert cp_bytes(cfg, 1, T, "full", 2, 8, 1) == pytest.approx((2 * 32 + 32) * gathered * 7 / 8)
    assert cp_bytes(cfg, 1, T, "none", 2, 8, 1) == pytest.approx(2 * 32 * gathered * 7 / 8)
    assert cp_seconds(cfg, 1, T, "none", 2, Layout(1, 1, 1, 1, 8), hw) == pytest.approx(
        2 * 32 * gathered * 7 / 8 / 350e9)
    assert cp_seconds(cfg, 1, T, "none", 2, Layout(1, 1, 2, 1, 8), hw) == pytest.approx(  # 16 GPUs: 2 nodes
        2 * 32 * gathered / 2 * 7 / 8 / 50e9)
    # FLOPs per token: 6 x 7,504,924,672 weights outside the embedding + 12 x 32 layers x 32 heads x 128 x T
    # attention; full AC re-runs the forward (x 4/3); 989 TFLOP/s x 55.4%, measured with selective AC's recompute
    # (0.04 of a forward) on, so the GPU ran (1 + 0.04 / 3) times the FLOPs the efficiency counts.
    weights, attention = 6 * 7_504_924_672, 12 * 32 * 32 * 128 * T
    rate = 989e12 * 0.554 * (1 + 0.04 / 3)
    p = plan(cfg, Layout(1, 1, 1, 1, 8), 1, T, "full", hw)  # GEMM sizes (GEMM_CURVE) move it by under 0.1%
    assert p["compute_s"] == pytest.approx(T * (weights + attention) * 4 / 3 / 8 / rate, rel=1e-3)
    dense = plan(cfg, Layout(1, 1, 1, 1, 8), 1, T, "full", Hardware(cp_mask_attention=2.0))
    assert dense["compute_s"] == pytest.approx(T * (weights + 2 * attention) * 4 / 3 / 8 / rate, rel=1e-3)
    assert p["cp_s"] == pytest.approx((2 * 32 + 32) * gathered * 7 / 8 / 350e9)
    # The K/V collectives are all exposed; FSDP over dp_shard x cp = 8 ranks hides 95% of its time.
    fsdp = p["comm_s"] * 0.05
    assert p["tokens_per_s_per_gpu"] == pytest.approx(T / 8 / (p["compute_s"] + p["cp_s"] + fsdp))
    assert p["memory_gib"]["cp_mask"] == pytest.approx(4 * 128 * 1025 * 4 / 2**30)  # a BlockMask of 128 x 1,024 tiles


def test_the_recommender_turns_to_context_parallelism_where_nothing_fits_without():
    """70B at 131,072 tokens on 16 H100s fits no layout of dp, tp and pp: the recommender tries cp = 2, 4, ... and
    picks one that fits; at 8,192 tokens (short of LONG_WINDOW) it plans no CP layout."""
    cfg = preset("70b")
    assert all(best_for_layout(cfg, lay, 131072, Hardware(), 2**24) is None for lay in layouts(cfg, 16, 131072,
                                                                                              Hardware()))
    best, plans = recommend(cfg, 16, 131072, Hardware(), 2**24)
    assert best is not None and best["layout"].cp in (2, 4, 8, 16) and best["total_gib"] <= 79.2
    assert best["layout"].gpus == 16 and best["layout"].pp == 1  # the trainer runs no CP with PP yet
    assert all(p["layout"].cp > 1 for p in plans)
    short = recommend(cfg, 16, 8192, Hardware(), 2**24)
    assert short[0]["layout"].cp == 1 and all(p["layout"].cp == 1 for p in short[1])


def test_plan_of_a_context_parallel_layout(capsys):
    code, out, _ = run(capsys, "+conf=long_8b", "gpus=8", "data.seq_len=131072", "global_batch_size=8", "tp=1", "cp=8")
    assert code == 0, out
    assert "8b on 8 GPUs (dp_shard 1 x cp 8), micro batch 1 x 131072" in out and "cp_mask 0.0" in out
    assert "CP (cp x tp consecutive ranks" in out.split("assumptions:")[1]
    recommended = out.split("recommendation: ")[1].splitlines()[0]
    assert "parallel.cp=1 " not in recommended  # long windows: CP beats full AC on a node
