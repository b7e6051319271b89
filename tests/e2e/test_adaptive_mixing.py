"""data.mixing=adaptive through the real entry point (one process each, tiny model): a model first trained on prose
(four plays, 60 steps) is trained on on a new domain, a table (CSV: play, line, words, chars, first word of each
line of those plays), with 10% prose replay, once with fixed weights and once adaptive. Prose validation loss
rises as the table is learnt; the adaptive run raises the prose share when it drifts past max_drift and ends with
the lower prose loss. A resume from the adaptive run's step-8
checkpoint goes on with the same weights, losses and samples. The adaptive run on 2 gloo ranks (FSDP, dp_shard=2) makes
the changes one process makes, on both ranks alike, and resumes there as exactly. About 40 s (6 runs)."""

import json
from pathlib import Path

import pytest
from helpers import TINY, ledger, losses, pretrain, tiny_data

from train.observe.report import panels

BASE_STEPS, STEPS, MAX_DRIFT = 60, 16, 0.02


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def validations(run: Path) -> list[dict]:
    """The validation records without their timing (val_s)."""
    return [{k: v for k, v in r.items() if k != "val_s"} for r in records(run) if "val/plays/loss" in r]


@pytest.fixture(scope="module")
def cpt(tmp_path_factory) -> list[str]:
    """The continued-pretraining overrides: [table, plays] at 0.9/0.1 from the prose model, both validated."""
    from data_pipeline.build import build_shards
    from data_pipeline.sample_corpus import sample_corpus_dir
    from data_pipeline.tokenizer import Tokenizer

    data = tiny_data(tmp_path_factory)
    tokenizer, plays = data[1].split("=", 1)[1], data[2].split("=", 1)[1].strip("[]")
    root = tmp_path_factory.mktemp("adaptive")
    rows = [f"{p.stem},{n},{len(line.split())},{len(line)},{line.split()[0].lower().strip(',.;:!?')}"
            for p in sorted(sample_corpus_dir().glob("*.txt"))[:4]
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines()) if line.split()]
    header = "play,line,words,chars,first_word\n"  # tables of 30 rows, one document each
    (root / "table.txt").write_text("\n\n".join(header + "\n".join(rows[i:i + 30]) for i in range(0, len(rows), 30)))
    table = build_shards([str(root / "table.txt")], root / "table", Tokenizer(tokenizer), txt_mode="paragraph",
                         val_fraction=0.1, num_proc=1, progress=False).parent
    base = root / "prose"
    pretrain(1, base, *TINY, *data, f"steps={BASE_STEPS}", "checkpoint.save_final=true", torchrun=False)
    return [*TINY, "data.demo=false", f"data.tokenizer={tokenizer}", f"data.shards=[{table},{plays}]",
            "data.weights=[0.9,0.1]", f"+data.val_sets.table={table}", f"+data.val_sets.plays={plays}",
            f"steps={STEPS}", "val_interval=4", "optim.warmup_steps=0",
            f"checkpoint.init_from={base}/checkpoints/step_{BASE_STEPS:08d}"]


ADAPTIVE = ["data.mixing=adaptive", "data.adaptive.watch=[table,plays]", f"data.adaptive.max_drift={MAX_DRIFT}",
            "data.adaptive.step=1.0"]


@pytest.fixture(scope="module")
def fixed(cpt, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fixed") / "run"
    pretrain(1, run, *cpt, torchrun=False)
    return run


@pytest.fixture(scope="module")
def adaptive(cpt, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("adaptive_run") / "run"
    pretrain(1, run, *cpt, *ADAPTIVE, "checkpoint.interval=8", torchrun=False)
    return run


@pytest.fixture(scope="module")
def two_ranks(cpt, tmp_path_factory) -> Path:
    """The adaptive run on 2 ranks: micro_batch_size=4 x 2 ranks, so that validation reads the windows one
    process reads (val_batches x micro_batch_size x ranks) and each step the same 16 global samples."""
    run = tmp_path_factory.mktemp("adaptive_2ranks") / "run"
    pretrain(2, run, *cpt, *ADAPTIVE, "checkpoint.interval=8", "micro_batch_size=4")
    return run


def taken(run: Path) -> dict[int, list[tuple[int, int, int]]]:
    """Each step's (global sample, its source, its place in that source's stream) over every rank's ledger, as each
    rank's own loader drew them with the weights it had in force (a step re-done after a resume: its last row)."""
    by_rank: dict[tuple[str, int], list] = {}
    for f in sorted((run / "ledger").glob("rank*.jsonl")):
        for row in map(json.loads, f.read_text().splitlines()):
            by_rank[f.name, row["step"]] = list(zip(row["samples"], row["sources"], row["source_samples"]))
    steps: dict[int, list] = {}
    for (_, step), rows in by_rank.items():
        steps.setdefault(step, []).extend(rows)
    return {step: sorted(rows) for step, rows in sorted(steps.items())}


def test_replay_rises_when_prose_drifts_and_prose_forgets_less(fixed, adaptive):
    steps = validations(adaptive)
    start = steps[0]
    assert start["step"] == 0 and start["mixture/plays"] == pytest.approx(0.1)  # the references: before any update
    raised = 0
    for before, now in zip(steps, steps[1:]):
        drift = now["val/plays/loss"] / start["val/plays/loss"] - 1
        if drift > MAX_DRIFT:  # forgetting: the prose share goes up from the next sample on
            assert now["mixture/plays"] > before["mixture/plays"], now
            raised += 1
        elif drift > 0:  # within the budget: held
            assert now["mixture/plays"] == before["mixture/plays"], now
        assert now["mixture/plays"] + now["mixture/table"] == pytest.approx(1)
    assert raised, f"prose never drifted past {MAX_DRIFT:.0%}: {[s['val/plays/loss'] for s in steps]}"
    log = (adaptive / "logs" / "rank0.log").read_text()
    assert "raise plays" in log and "is +" in log and "0.1 -> 0.2" in log  # the reason and the change, logged
    first_change = next(s["step"] for b, s in zip(steps, steps[1:]) if s["mixture/plays"] != b["mixture/plays"])
    same = {k: v for k, v in losses(fixed).items() if k <= first_change}
    assert same == {k: v for k, v in losses(adaptive).items() if k <= first_change}  # equal until the first change
    assert not any(k.startswith("mixture/") for r in records(fixed) for k in r)  # fixed: as before
    end_fixed, end_adaptive = validations(fixed)[-1], steps[-1]
    assert end_adaptive["val/plays/loss"] < end_fixed["val/plays/loss"], (end_adaptive, end_fixed)
    keys = sorted({k for r in records(adaptive) for k in r})
    assert ("data mixture weights", ["mixture/plays", "mixture/table"]) in panels(keys)


def test_resume_goes_on_with_the_weights_losses_and_samples(cpt, adaptive, tmp_path_factory):
    resumed = tmp_path_factory.mktemp("adaptive_resumed") / "run"
    pretrain(1, resumed, *cpt, *ADAPTIVE, f"checkpoint.resume={adaptive}/checkpoints/step_00000008", torchrun=False)
    straight = losses(adaptive)
    assert losses(resumed) == {k: v for k, v in straight.items() if k > 8}  # bit-exact
    # the step-8 checkpoint was saved before step 8's validation (and its change): the resumed run redoes it
    assert validations(resumed) == [r for r in validations(adaptive) if r["step"] >= 8]  # weights and val losses
    rows = {}
    for run in (adaptive, resumed):
        for line in (run / "ledger" / "rank0.jsonl").read_text().splitlines():
            rows.setdefault(run, {})[json.loads(line)["step"]] = json.loads(line)
    assert rows[resumed] == {s: r for s, r in rows[adaptive].items() if s > 8}  # samples and their sources
    taken = [(src, k) for r in rows[adaptive].values() for src, k in zip(r["sources"], r["source_samples"])]
    assert len(set(taken)) == len(taken) == sum(len(v) for v in ledger(adaptive).values())  # each once
    for src in (0, 1):  # each source's own stream, gap-free from its start across the weight changes
        assert sorted(k for s, k in taken if s == src) == list(range(sum(s == src for s, _ in taken)))


def test_two_ranks_change_the_weights_alike_and_resume_exactly(cpt, adaptive, two_ranks, tmp_path_factory):
    """Every rank reacts to the same (all-reduced) validation losses: the 2-rank run's weight changes are one
    process's, at the same steps, and each rank's loader drew its half of every step with them (the two ledgers
    together are one process's samples, each from the same source). A 2-rank resume from its step-8 checkpoint goes
    on bit-exact: losses, validations and weights, each sample taken once."""
    mixtures = [{k: v for k, v in r.items() if k.startswith("mixture/")} | {"step": r["step"]}
                for r in validations(two_ranks)]
    assert mixtures == [{k: v for k, v in r.items() if k.startswith("mixture/")} | {"step": r["step"]}
                        for r in validations(adaptive)]
    assert len({r["mixture/plays"] for r in validations(two_ranks)}) > 1  # the weights did change
    for ours, one in zip(validations(two_ranks), validations(adaptive)):
        assert ours["val/plays/loss"] == pytest.approx(one["val/plays/loss"], abs=1e-5), ours["step"]
    assert taken(two_ranks) == taken(adaptive)  # both ranks sampled with the weights one process had
    log = (two_ranks / "logs" / "rank0.log").read_text()
    assert "raise plays" in log and "data mixture weights from global sample" in log

    resumed = tmp_path_factory.mktemp("adaptive_2ranks_resumed") / "run"
    pretrain(2, resumed, *cpt, *ADAPTIVE, "micro_batch_size=4",
             f"checkpoint.resume={two_ranks}/checkpoints/step_00000008")
    assert losses(resumed) == {k: v for k, v in losses(two_ranks).items() if k > 8}  # bit-exact
    assert validations(resumed) == [r for r in validations(two_ranks) if r["step"] >= 8]
    assert taken(resumed) == {s: rows for s, rows in taken(two_ranks).items() if s > 8}
    drawn = [(src, k) for rows in taken(two_ranks).values() for _, src, k in rows]
    assert len(set(drawn)) == len(drawn) == sum(len(v) for v in ledger(two_ranks).values())  # each sample once
