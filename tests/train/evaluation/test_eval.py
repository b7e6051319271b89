"""launch/eval.py on a real run: its shard set gives the run's own validation loss, its HF export and torchrun
(dp_shard=2 x tp=2 on 4 ranks; tp=2, pp=2 and cp=2 on 2, with lm-eval's tasks under tp and pp) the same numbers,
raw text and JSONL give rows, bits per byte agrees with a count by hand, bad input fails in one line. One
module-scoped run serves all; the 4-rank torchrun eval runs while the others run in this process."""

import contextlib
import io
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data_pipeline import progress
from data_pipeline.tokenizer import Tokenizer, train_tokenizer
from launch import eval as eval_cli
from launch.generate import load_model
from model.loss import IGNORE_INDEX
from train.config import ParallelSection
from train.evaluation.evaluate import Settings, check_layout, padded_batch, source_model_config, windows
from train.interop.hf_export import export_hf
from train.interop.offline_checkpoint import find_checkpoint
from train.loop.validation import bits_per_byte, label_bytes

from helpers import REPO, TINY, TORCHRUN, env, pretrain, tiny_data  # noqa: E402
from local_task import write_open_tasks, write_task  # noqa: E402

EVAL = REPO / "launch" / "eval.py"
# One document (a .txt file is one), non-ASCII included: UTF-8 bytes differ from characters.
TEXT = "ROMEO: But soft, what light through yonder window breaks? Ça va — naïve."
SOURCES = ("shards", "tiny.txt", "scenes.jsonl", "play.txt")


def start(*cmd) -> subprocess.Popen:
    return subprocess.Popen([*map(str, cmd)], env={**env(), "HF_DATASETS_OFFLINE": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out


def setting(overrides: list[str], key: str) -> str:
    return next(o.split("=", 1)[1] for o in overrides if o.startswith(f"data.{key}=")).strip("[]")


def write_texts(root: Path, play: Path) -> dict[str, Path]:
    """The text sources: one tiny document, a JSONL of scenes of a play, a whole play."""
    (root / "tiny.txt").write_text(TEXT, encoding="utf-8")
    scenes = play.read_text(encoding="utf-8").split("\n\n")[:40]
    (root / "scenes.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in scenes), encoding="utf-8")
    (root / "play.txt").write_text(play.read_text(encoding="utf-8"), encoding="utf-8")
    return {name: root / name for name in SOURCES[1:]}


@pytest.fixture(scope="module")
def world(tmp_path_factory, sample_corpus):
    """A 3-step run saved at its end, its HF export, the text sources, and the 4-rank torchrun eval, started
    here to run while the tests run the CLI's main in this process (what a second interpreter would cost)."""
    root = tmp_path_factory.mktemp("eval")
    data, run, hf = tiny_data(tmp_path_factory), root / "run", root / "hf"
    pretrain(1, run, *TINY, *data, "checkpoint.save_final=true", "steps=3", torchrun=False)
    tok = Path(setting(data, "tokenizer"))
    export_hf(find_checkpoint(run), hf)  # weights only (no transformers import): eval gets tokenizer=
    paths = {"shards": Path(setting(data, "shards")), **write_texts(root, sorted(sample_corpus.glob("*.txt"))[-1])}
    common = [f"data=[{','.join(str(paths[s]) for s in SOURCES)}]", "batch_size=8", "max_batches=2"]
    # 4 ranks, tp=2: FSDP over dp_shard=2 x TP 2 (the layout the issue names beside tp=2 and pp=2 alone)
    ranks2 = start(*TORCHRUN, "--standalone", "--nproc_per_node=4", EVAL, f"checkpoint={run}", *common, "tp=2",
                   f"out={root / 'ranks2.json'}")
    yield {"root": root, "run": run, "hf": hf, "tok": tok, "paths": paths, "common": common, "ranks2": ranks2,
           "done": {}}
    if ranks2.poll() is None:  # a failed or deselected test left it running
        ranks2.terminate()
        ranks2.communicate(timeout=60)


def one_process(world, name: str, *argv: str) -> tuple[str, list[dict]]:
    """(stdout, JSON rows) of `python launch/eval.py ... device=cpu` (its main, here), run once per name."""
    if name not in world["done"]:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            eval_cli.main([*argv, *world["common"], "device=cpu"])
        world["done"][name] = printed.getvalue()
    return world["done"][name], json.loads(Path(printed_json(world, name)).read_text())["rows"]


def printed_json(world, name: str) -> str:
    """The `wrote <file>` a run printed last."""
    return world["done"][name].strip().splitlines()[-1].removeprefix("wrote ")


def from_run_dir(world) -> tuple[str, list[dict]]:
    return one_process(world, "run", f"checkpoint={world['run']}")  # writes <run>/eval.json


def assert_same_rows(a: list[dict], b: list[dict]) -> None:
    assert [r["source"] for r in a] == [r["source"] for r in b]
    for x, y in zip(a, b):
        assert (x["tokens"], x["bytes"]) == (y["tokens"], y["bytes"])
        for key in ("loss", "bits_per_byte"):
            assert abs(x[key] - y[key]) < 1e-5, (x, y)


def test_run_checkpoint_reproduces_validation_and_prints_rows(world):
    out, rows = from_run_dir(world)
    assert Path(printed_json(world, "run")) == world["run"] / "eval.json"
    assert [r["source"] for r in rows] == [str(world["paths"][s]) for s in SOURCES]
    for r in rows:  # one table row per source, with its figures
        line = next(line for line in out.splitlines() if line.startswith(r["source"]))
        assert f"{r['tokens']:,}" in line and f"{r['loss']:.4f}" in line and f"{r['bits_per_byte']:.4f}" in line
        assert r["tokens"] > 0 and r["bytes"] > 0 and math.isclose(r["perplexity"], math.exp(r["loss"]))
    logged = [json.loads(line) for line in (world["run"] / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in logged if "val_loss" in r][-1]  # the final validation, of the saved weights
    assert abs(rows[0]["loss"] - val["val_loss"]) < 1e-5
    if "val/val/bpb" in val:  # bits per byte of the same windows, where the loop logs it
        assert abs(rows[0]["bits_per_byte"] - val["val/val/bpb"]) < 1e-5
    assert rows[SOURCES.index("play.txt")]["tokens"] == 2 * 8 * 64  # max_batches=2 full batches of 8 x seq_len


def test_bits_per_byte_by_hand(world):
    """Total nats from the model's logits over BOS + text + EOS, / ln 2 / the text's UTF-8 bytes."""
    _, rows = from_run_dir(world)
    row = rows[SOURCES.index("tiny.txt")]
    tok = Tokenizer(world["tok"])
    ids = torch.tensor([tok.bos_id, *tok.encode(TEXT), tok.eos_id])
    model = load_model(world["run"], torch.device("cpu"))
    with torch.no_grad():
        logits = model(ids[None, :-1])[0]
    nats = F.cross_entropy(logits.double(), ids[1:], reduction="sum").item()
    assert row["tokens"] == len(ids) - 1 and row["bytes"] == len(TEXT.encode("utf-8"))
    assert math.isclose(row["loss"], nats / (len(ids) - 1), rel_tol=1e-5)
    assert math.isclose(row["bits_per_byte"], nats / math.log(2) / len(TEXT.encode("utf-8")), rel_tol=1e-5)


def test_hf_export_gives_the_same_numbers(world):
    _, ours = from_run_dir(world)
    _, theirs = one_process(world, "hf", f"checkpoint={world['hf']}", f"tokenizer={world['tok']}", "seq_len=64",
                            f"out={world['root'] / 'hf.json'}")
    assert_same_rows(theirs, ours)


def test_dp_shard2_x_tp2_equals_one_process(world):
    """FSDP over 2 data-parallel ranks (each scores its half of every batch) x tp=2: one process's figures."""
    _, ours = from_run_dir(world)
    finish(world["ranks2"])
    four = json.loads((world["root"] / "ranks2.json").read_text())["rows"]
    assert json.loads((world["root"] / "ranks2.json").read_text())["processes"] == 4
    assert_same_rows(four, ours)


# Training's layouts on 2 ranks (no data parallelism left: every rank reads every row); pp as training's key.
LAYOUTS = {"tp2": ["tp=2"], "pp2": ["parallel.pp=2", "pp_schedule=1F1B"], "cp2": ["cp=2"]}
# tests/support/local_task.py: 4 multiple-choice questions (16 requests), and greedy text and rolling log-likelihoods
TASK, OPEN_TASKS, LIMIT = "shakespeare_next_words", ["next_words_gen", "next_words_rolling"], 4
WITH_TASKS = ("tp2", "pp2")  # (under cp2 lm-eval's windows run whole, as on one process: not run again here)


def tasks_of_one_process(world) -> tuple[dict, list[dict]]:
    """The local task on the checkpoint in this process (what llm-eval tasks= runs on one): its figures, and each
    request's log-likelihood."""
    if "tasks" not in world["done"]:
        from launch.generate import open_tokenizer
        from train.evaluation.harness import run_tasks

        task_dir = world["root"] / "tasks"
        if not task_dir.is_dir():
            task_dir.mkdir()
            write_task(task_dir)
            write_open_tasks(task_dir)
        tok = open_tokenizer({"path": str(world["run"])}, find_checkpoint(world["run"]))
        table, requests = run_tasks(load_model(world["run"], torch.device("cpu")), tok, torch.device("cpu"),
                                    [TASK, *OPEN_TASKS], str(task_dir), LIMIT)
        world["done"]["tasks"] = table[TASK], requests
    return world["done"]["tasks"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_equal_one_process(world, layout):
    """The model laid out as training lays it out (TP; PP through the 1F1B schedule, a step of 2 micro-batches of
    8 rows; CP), the single-rank checkpoint loaded into that layout: the figures of one process, to 1e-5 in fp32;
    and (tp2, pp2) lm-eval's local tasks (tasks=) on every rank in that layout: one process's accuracy, each
    request's log-likelihood (rolling ones too) to 1e-5 and each greedy text, written by rank 0."""
    tasks = [f"tasks=[{','.join([TASK, *OPEN_TASKS])}]", f"task_dir={world['root'] / 'tasks'}", f"limit={LIMIT}"]
    tasks = tasks if layout in WITH_TASKS else []
    one_task, one_requests = tasks_of_one_process(world) if tasks else (None, None)
    out = world["root"] / f"{layout}.json"
    finish(start(*TORCHRUN, "--standalone", "--nproc_per_node=2", EVAL, f"checkpoint={world['run']}",
                 *world["common"], *LAYOUTS[layout], f"out={out}", *tasks))
    record = json.loads(out.read_text())
    assert record["processes"] == 2
    assert_same_rows(record["rows"], from_run_dir(world)[1])
    if not tasks:
        return
    assert record["tasks"][TASK]["samples"] == LIMIT and record["tasks"][TASK]["acc"] == one_task["acc"]
    requests = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    assert [r["arguments"] for r in requests] == [r["arguments"] for r in one_requests]
    assert [r.get("text") for r in requests] == [r.get("text") for r in one_requests]  # generated (None: scored)
    # to 1e-5, or fp32's resolution of a sum near 200 (its last bit is 1.5e-5)
    assert [r.get("loglikelihood", 0) for r in requests] == pytest.approx(
        [r.get("loglikelihood", 0) for r in one_requests], abs=1e-5, rel=1e-7)


def test_layout_refusals_are_one_line(world, capsys):
    """A layout without torchrun, a batch the data-parallel ranks do not divide, a window cp x tp cannot split."""
    with pytest.raises(SystemExit) as exited:
        eval_cli.main([f"checkpoint={world['run']}", f"data=[{world['paths']['tiny.txt']}]", "parallel.tp=2"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 1 and len(lines) == 1 and "torchrun" in lines[0] and "tp=" in lines[0], lines
    model_cfg = source_model_config(world["run"])
    with pytest.raises(ValueError, match="batch_size=6 must be a positive multiple of the 4 data-parallel ranks"):
        check_layout(model_cfg, ParallelSection(tp=2), Settings(seq_len=64, batch_size=6), dp_size=4)
    with pytest.raises(ValueError, match="seq_len=62 must be divisible by 2 x cp x tp = 4"):
        check_layout(model_cfg, ParallelSection(cp=2), Settings(seq_len=62, batch_size=8), dp_size=1)


@pytest.mark.parametrize("wrong", ["checkpoint", "data", "tokenizer", "no tokenizer"])
def test_one_line_errors(world, capsys, wrong):
    """In this process (the CLI's own main: what it prints and its exit status), to spare the interpreters: a
    missing checkpoint, a missing data path, a tokenizer the model was not trained with, a file that is no
    tokenizer at all."""
    key = wrong.split()[-1]
    named = world["root"] / f"no_such_{key}"
    args = {"checkpoint": world["run"], "data": f"[{world['paths']['tiny.txt']}]"}
    if wrong == "tokenizer":  # another one, trained on other text
        named = train_tokenizer([str(world["paths"]["play.txt"])], named, vocab_size=512, num_threads=1).path
    if wrong == "no tokenizer":  # a text file: neither SentencePiece nor tiktoken's format
        named = world["root"] / "notes.model"
        named.write_text("remember to pass the tokenizer\n")
    args[key] = f"[{named}]" if key == "data" else named
    with pytest.raises(SystemExit) as exited:
        eval_cli.main([f"{key}={value}" for key, value in args.items()])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert exited.value.code == 1 and not out
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(named) in lines[0], err


def test_progress_without_a_terminal_is_log_lines(world, monkeypatch, capsys):
    """stderr is no terminal under pytest (as under SLURM or a pipe): no bar, but on stderr a line per
    LOG_EVERY_S (0 here: one a batch) with the tokens done of the total, tokens/s and the time left, and one
    when a source is done; a shard set's total is exact, a text's estimated from its bytes."""
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    out = world["root"] / "progress.json"
    eval_cli.main([f"checkpoint={world['run']}", f"data=[{world['paths']['shards']},{world['paths']['play.txt']}]",
                   "batch_size=8", "max_batches=2", "device=cpu", f"out={out}"])
    err = capsys.readouterr().err
    assert "it/s" not in err and "\r" not in err, err  # no tqdm bar
    for row in json.loads(out.read_text())["rows"]:
        lines = [line for line in err.splitlines() if line.startswith(f"evaluating {Path(row['source']).name}: ")]
        total = f" of {tqdm.format_sizeof(row['tokens'])} tokens (" if "play" not in row["source"] else " of "
        assert len(lines) == 3 and all(" tokens/s, " in line and " left" in line for line in lines[:2]), err
        assert total in lines[0] and "(50%)" in lines[0], (row, lines)
        assert lines[2].startswith(f"evaluating {Path(row['source']).name}: {tqdm.format_sizeof(row['tokens'])} "
                                   f"tokens in "), (row, lines)


def test_windows_predict_every_token_once_and_padding_is_ignored():
    stream = [np.arange(0, 7), np.arange(7, 10), np.arange(10, 13)]  # 13 tokens in uneven chunks
    got = [w.copy() for w in windows(iter(stream), seq_len=4)]
    assert [w.tolist() for w in got] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10, 11, 12]]
    short = [w.copy() for w in windows(iter([np.arange(7)]), seq_len=4)]
    assert [w.tolist() for w in short] == [[0, 1, 2, 3, 4], [4, 5, 6]]
    batch = padded_batch(short, 3, 4, bos_id=99, s=Settings(seq_len=4, batch_size=3))
    labels = batch["labels"].tolist()
    assert labels == [[1, 2, 3, 4], [5, 6, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX] * 4]


def test_label_bytes_counts_ignored_and_dummy_prefix():
    table = np.array([0, 0, 3, 5])  # ids 0, 1 special (BOS = 1); 2 and 3 text of 3 and 5 bytes
    inputs, labels = np.array([[1, 2, 3, 2]]), np.array([[2, 3, IGNORE_INDEX, 1]])
    assert label_bytes(inputs, labels, table, False, 1) == 3 + 5
    assert label_bytes(inputs, labels, table, True, 1) == 2 + 5  # the first word's added space is no byte
    assert math.isclose(bits_per_byte(8 * math.log(2), 4), 2.0)
