"""lm-evaluation-harness through `launch/eval.py tasks=...`: a 20-question multiple-choice task defined
locally (a task YAML over a local jsonl file: hub datasets are unreachable offline), half its contexts ending
in a space; each per-sample log-likelihood equals an oracle's that splits context from continuation by the
text's characters (not by the implementation's token counts), and the accuracy is the oracle's argmax's. The same
task in the loop (eval.tasks) gives at each interval what the harness gives on that step's checkpoint; a task that
does not exist or does not load fails at start-up in one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY, env, pretrain, tiny_data
from local_task import TASK, write_task

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("harness") / "run"
    pretrain(1, run, *TINY, *tiny_data(tmp_path_factory), "steps=8", "checkpoint.save_final=true", torchrun=False)
    return run


def oracle_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Minus the model's summed training loss over the continuation's tokens after BOS + context. The whole
    text is encoded once and split at the first token prefix whose decoded text is the context's characters
    (without the space that ends it: the tokenizer writes that space into the next word's token); no token
    may straddle that point."""
    ids, boundary = tok.encode(context + continuation), len(context.rstrip(" "))
    n_context = next(k for k in range(len(ids) + 1) if len(tok.decode(ids[:k])) >= boundary)
    assert tok.decode(ids[:n_context]) == context[:boundary], (context, continuation)
    tokens = torch.tensor([[tok.bos_id, *ids]])
    targets = tokens[:, 1:].clone()  # position t predicts token t + 1
    targets[0, :n_context] = -100  # the context's tokens are given, not scored
    with torch.no_grad():
        return -float(model(tokens[:, :-1], labels=targets))


def test_local_multiple_choice_task(run, tmp_path):
    from launch.generate import load_model, open_tokenizer
    from train.interop.offline_checkpoint import find_checkpoint

    questions, out = write_task(tmp_path), tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "eval.py"), f"checkpoint={run}",
                           "tasks=[shakespeare_next_words]", f"task_dir={tmp_path}", f"out={out}"],
                          cwd=tmp_path, env={**env(), "HF_DATASETS_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())["tasks"]["shakespeare_next_words"]
    assert result["samples"] == 20
    assert "shakespeare_next_words" in proc.stdout and "acc" in proc.stdout

    samples = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    by_question = {s["doc_id"]: [] for s in samples}
    for s in samples:
        by_question[s["doc_id"]].append(s)
    assert sorted(by_question) == list(range(20)) and all(len(v) == 4 for v in by_question.values())
    source = find_checkpoint(run)
    tok = open_tokenizer({"path": str(run)}, source)
    model = load_model(source, torch.device("cpu"))
    right = 0
    for doc, q in enumerate(questions):
        asked = by_question[doc]
        assert [s["arguments"] for s in asked] == [[q["question"], c] for c in q["choices"]]  # what we wrote
        oracle = [oracle_loglikelihood(model, tok, q["question"], c) for c in q["choices"]]
        assert [s["loglikelihood"] for s in asked] == pytest.approx(oracle, abs=1e-4), q
        right += max(range(4), key=oracle.__getitem__) == q["answer"]
    assert sum(q["question"].endswith(" ") for q in questions) == 10
    assert result["acc"] == pytest.approx(right / 20)  # the accuracy is the argmax of the oracle's log-likelihoods


def test_continuations_are_scored_rows_to_a_forward(run):
    """Scorer(rows=4) scores 9 continuations of a play (contexts of 2 to 2,000 words: the longest cut to the model's
    context; plus an empty continuation, certain without a forward) in 3 forwards, the longest windows first; each
    log-likelihood and greedy flag is the one it gets scored alone, to 1e-5."""
    from data_pipeline.sample_corpus import sample_corpus_dir
    from launch.generate import load_model, open_tokenizer
    from train.evaluation.harness import Scorer
    from train.interop.offline_checkpoint import find_checkpoint

    source = find_checkpoint(run)
    tok, model = open_tokenizer({"path": str(run)}, source), load_model(source, torch.device("cpu"))
    words = sorted(sample_corpus_dir().glob("*.txt"))[0].read_text(encoding="utf-8").split()[500:]
    pairs = [(" ".join(words[:n]), " " + " ".join(words[n:n + k])) for n, k in
             [(2, 1), (40, 3), (7, 2), (2000, 4), (15, 1), (90, 5), (3, 3), (25, 2), (60, 1)]]
    pairs.insert(4, (" ".join(words[:9]), ""))
    widths: list[tuple[int, int]] = []
    counting = model.register_forward_hook(lambda _m, args, _out: widths.append(tuple(args[0].shape)))
    batched = Scorer(model, tok, torch.device("cpu"), rows=4).continuations(pairs)
    counting.remove()
    alone = Scorer(model, tok, torch.device("cpu"), rows=1).continuations(pairs)
    assert [rows for rows, _ in widths] == [4, 4, 1]
    assert widths[0][1] == model.cfg.max_seq_len and widths[0][1] >= widths[1][1] >= widths[2][1]
    assert batched[4] == alone[4] == (0.0, True)
    assert [b[0] for b in batched] == pytest.approx([a[0] for a in alone], abs=1e-5)
    assert [b[1] for b in batched] == [a[1] for a in alone]


def test_rolling_windows_are_scored_rows_to_a_forward(run):
    """Scorer(rows=4).rollings of 4 passages of a play (3 to 1,500 words: the long ones in several windows of the
    model's context) equals, per passage to 1e-4 (or 1e-6 of it), minus the model's summed training loss over
    lm-eval's own rolling windows of it (lm_eval.utils.get_rolling_token_windows, context 1, as its Hugging Face
    model asks them), and takes ceil(windows / 4) forwards in all."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from data_pipeline.sample_corpus import sample_corpus_dir
    from launch.generate import load_model, open_tokenizer
    from train.evaluation.harness import Scorer
    from train.interop.offline_checkpoint import find_checkpoint

    source = find_checkpoint(run)
    tok, model = open_tokenizer({"path": str(run)}, source), load_model(source, torch.device("cpu"))
    words = sorted(sample_corpus_dir().glob("*.txt"))[1].read_text(encoding="utf-8").split()
    texts = [" ".join(words[first:first + n]) for first, n in [(0, 1500), (1900, 3), (2200, 60), (3000, 700)]]
    oracle, windows = [], 0
    for text in texts:
        total = 0.0
        for context, predicted in map(make_disjoint_window, get_rolling_token_windows(
                tok.encode(text), tok.bos_id, model.cfg.max_seq_len, 1)):
            tokens = torch.tensor([context + predicted])
            targets = tokens[:, 1:].clone()  # position t predicts token t + 1
            targets[0, :len(context) - 1] = -100  # the window's context is given, not scored
            with torch.no_grad():
                total -= float(model(tokens[:, :-1], labels=targets))
            windows += 1
        oracle.append(total)
    assert windows >= len(texts) + 3, windows  # the long passages span several windows
    forwards = []
    counting = model.register_forward_hook(lambda _m, args, _out: forwards.append(args[0].shape[0]))
    rolled = Scorer(model, tok, torch.device("cpu"), rows=4).rollings(texts)
    counting.remove()
    assert rolled == pytest.approx(oracle, rel=1e-6, abs=1e-4)  # sums of up to ~30k nats in float32
    assert sum(forwards) == windows and len(forwards) == -(-windows // 4)


def test_greedy_requests_are_generated_rows_to_a_forward(run):
    """Scorer(rows=4).untils of 6 generate_until requests (contexts of 2 to 300 words of a play, the longest past the
    model's context; budgets of 0 to 24 tokens; stop strings taken from the text itself) gives each the text that
    model.generate gives it alone (greedy, the whole budget, cut at its first stop string), in 2 batches, longest
    context first, each as many forwards as its slowest request needs tokens: a request is done at its budget or
    once its text holds a stop string. The model is the run's, freshly initialised: 8 steps of training leave a model
    whose greedy text is newlines whatever it is asked, which any row's position would give."""
    from data_pipeline.sample_corpus import sample_corpus_dir
    from launch.generate import load_model, open_tokenizer
    from model import build_model
    from model.generate import generate
    from train.evaluation.harness import Scorer
    from train.interop.offline_checkpoint import find_checkpoint

    source = find_checkpoint(run)
    tok, model = open_tokenizer({"path": str(run)}, source), build_model(load_model(source, "cpu").cfg, seed=5)
    words = sorted(sample_corpus_dir().glob("*.txt"))[2].read_text(encoding="utf-8").split()[100:]

    def alone(context: str, budget: int) -> list[int]:  # the greedy tokens after the context, the whole budget
        ids = torch.tensor([[tok.bos_id, *tok.encode(context)][-model.cfg.max_seq_len:]])
        return generate(model, ids, budget, temperature=0.0, eos_id=tok.eos_id)[0, ids.shape[1]:].tolist()

    asked, tokens_needed, expected = [], [], []
    for n, budget, stop_at in [(2, 24, 12), (40, 16, None), (300, 24, 30), (7, 0, None), (90, 24, 5), (15, 8, 20)]:
        context = " ".join(words[:n])
        ids = alone(context, budget)
        text = tok.decode(ids)
        stops = [text[stop_at:stop_at + 3]] if stop_at is not None and len(text) > stop_at + 3 else []
        asked.append((context, {"until": ["never said", *stops], "max_gen_toks": budget}))
        cut = min([text.find(s) for s in stops], default=len(text))
        expected.append(text[:cut])
        tokens_needed.append(next((k for k in range(1, len(ids) + 1) if any(s in tok.decode(ids[:k]) for s in stops)),
                                  len(ids)))
    assert sum(e != tok.decode(alone(c, s["max_gen_toks"])) for (c, s), e in zip(asked, expected)) >= 2  # stops cut
    widths: list[int] = []
    counting = model.register_forward_hook(lambda _m, args, _out: widths.append(args[0].shape[0]))
    answers = Scorer(model, tok, torch.device("cpu"), rows=4).untils(asked)
    counting.remove()
    assert answers == expected
    longest_first = sorted(range(6), key=lambda i: -len(asked[i][0]))
    batches = [longest_first[:4], longest_first[4:]]
    assert len(widths) == sum(max(tokens_needed[i] for i in batch) for batch in batches)
    assert widths[0] == 4 and sum(widths) == sum(tokens_needed)  # the finished leave the batch


def test_chat_task_asks_through_the_template(run, tmp_path):
    """format=chat: each context is a user turn rendered with the chat template and its generation prompt, tokenized
    with its special tokens as one id each, and no BOS added before the template's own. The oracle writes the
    rendering and its ids by hand from the template's text."""
    from data_pipeline.prepare import DEMO_TEMPLATE
    from launch.generate import load_model, open_tokenizer
    from train.interop.offline_checkpoint import find_checkpoint

    questions, out = write_task(tmp_path)[:4], tmp_path / "eval.json"
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (tmp_path / "chat.jinja").write_text(DEMO_TEMPLATE)
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "eval.py"), f"checkpoint={run}",
                           "tasks=[shakespeare_next_words]", f"task_dir={tmp_path}", f"out={out}", "format=chat",
                           f"template={tmp_path / 'chat.jinja'}"],
                          cwd=tmp_path, env={**env(), "HF_DATASETS_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    source = find_checkpoint(run)
    tok = open_tokenizer({"path": str(run)}, source)
    model = load_model(source, torch.device("cpu"))
    samples = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16
    for s in samples:
        q = questions[s["doc_id"]]
        context, choice = s["arguments"]
        assert context == f"{tok.bos_token}<|user|>\n{q['question']}{tok.eos_token}\n<|assistant|>\n"
        head = [tok.bos_id, *tok.encode(f"<|user|>\n{q['question']}"), tok.eos_id]
        given, whole = head + tok.encode("\n<|assistant|>\n"), head + tok.encode("\n<|assistant|>\n" + choice)
        assert whole[:len(given)] == given
        tokens = torch.tensor([whole])
        targets = tokens[:, 1:].clone()
        targets[0, :len(given) - 1] = -100
        with torch.no_grad():
            assert s["loglikelihood"] == pytest.approx(-float(model(tokens[:, :-1], labels=targets)), abs=1e-4)


TASK_IN_LOOP = TASK + """  - metric: brier_score
    higher_is_better: false
"""


IN_LOOP = ["steps=4", "eval.limit=8", "eval.interval=2", "checkpoint.interval=2", "checkpoint.save_final=true",
           "checkpoint.keep_last=4"]


@pytest.fixture(scope="module")
def in_loop(tmp_path_factory) -> tuple[Path, Path]:
    """(a 4-step run with the task in the loop at steps 2 and 4 and a checkpoint at each, the task's folder)."""
    tasks = tmp_path_factory.mktemp("in_loop_task")
    write_task(tasks)
    (tasks / "next_words.yaml").write_text(TASK_IN_LOOP.format(questions=tasks / "questions.jsonl"))
    run = tmp_path_factory.mktemp("in_loop") / "run"
    pretrain(1, run, *TINY, *tiny_data(tmp_path_factory), *IN_LOOP, "eval.tasks=[shakespeare_next_words]",
             f"eval.task_dir={tasks}", "report=true", torchrun=False)
    return run, tasks


def offline_tasks(checkpoint: Path, run: Path, tasks: Path) -> dict:
    """What the offline harness (llm-eval tasks=) gives on a checkpoint, one process."""
    from launch.generate import load_model, open_tokenizer
    from train.evaluation.harness import run_tasks

    tok = open_tokenizer({"path": str(run)}, checkpoint)
    table, _ = run_tasks(load_model(checkpoint, torch.device("cpu")), tok, torch.device("cpu"),
                         ["shakespeare_next_words"], str(tasks), 8)
    return table["shakespeare_next_words"]


def test_tasks_in_the_loop_equal_llm_eval_on_each_checkpoint(in_loop):
    """eval.tasks: at each eval.interval the in-loop task's accuracy and Brier score (continuous: the model's
    probabilities) equal those of the offline harness (what llm-eval tasks= runs) on that step's checkpoint; they go to
    metrics.jsonl with their cost, and to a report panel of the task's own."""
    from train.observe.report import load_run, panels

    (run, tasks), task = in_loop, "shakespeare_next_words"
    records = [r for r in load_run(run).records if f"eval/{task}/acc" in r]
    assert [r["step"] for r in records] == [2, 4] and all(r["eval_s"] > 0 for r in records)
    assert records[0][f"eval/{task}/brier_score"] != records[1][f"eval/{task}/brier_score"]  # the model moved
    for r in records:
        offline = offline_tasks(run / "checkpoints" / f"step_{r['step']:08d}", run, tasks)
        assert offline["samples"] == r[f"eval/{task}/samples"] == 8
        assert r[f"eval/{task}/acc"] == offline["acc"], r["step"]
        assert r[f"eval/{task}/brier_score"] == pytest.approx(offline["brier_score"], abs=1e-6), r["step"]
    keys = list(dict.fromkeys(k for r in load_run(run).records for k in r))
    assert (f"{task} (lm-eval)", [f"eval/{task}/acc", f"eval/{task}/brier_score"]) in panels(keys)
    assert (run / "report.png").is_file()


def test_tasks_in_the_loop_under_pipeline_parallelism(in_loop, tmp_path_factory, tmp_path):
    """pp=2 (1F1B) on 2 gloo ranks: each window goes through the schedule and the last stage's log-likelihoods reach
    both ranks; at each interval the accuracy is one process's, the Brier score to 1e-5 (the weights differ by
    rounding), and the final step's equals the offline harness's on the pp run's own checkpoint."""
    (one, tasks), task = in_loop, "shakespeare_next_words"
    run = tmp_path / "run"
    pretrain(2, run, *TINY, *tiny_data(tmp_path_factory), *IN_LOOP, f"eval.tasks=[{task}]", f"eval.task_dir={tasks}",
             "parallel.pp=2", "parallel.pp_schedule=1F1B")
    ours, theirs = ([r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                     if f"eval/{task}/acc" in r] for d in (run, one))
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == [2, 4]
    for a, b in zip(ours, theirs):
        assert a[f"eval/{task}/samples"] == 8 and a[f"eval/{task}/acc"] == b[f"eval/{task}/acc"], a["step"]
        assert a[f"eval/{task}/brier_score"] == pytest.approx(b[f"eval/{task}/brier_score"], abs=1e-5), a["step"]
    offline = offline_tasks(run / "checkpoints" / "step_00000004", run, tasks)
    assert ours[-1][f"eval/{task}/acc"] == offline["acc"]
    assert ours[-1][f"eval/{task}/brier_score"] == pytest.approx(offline["brier_score"], abs=1e-6)
    assert "lm-eval tasks took" in (run / "logs" / "rank0.log").read_text()


def test_a_task_that_does_not_exist_fails_at_start_up(tmp_path_factory, tmp_path):
    """One line naming eval.tasks and the task before step 1: a non-zero exit, and no checkpoint."""
    proc = pretrain(1, tmp_path / "run", *TINY, *tiny_data(tmp_path_factory), "eval.tasks=[no_such_task]",
                    f"eval.task_dir={tmp_path}", "checkpoint.save_final=true", torchrun=False, check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].endswith(f"eval.tasks=no_such_task is not a task of lm-eval or {tmp_path}"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "step 1:" not in proc.stdout + proc.stderr
    assert not list((tmp_path / "run").glob("checkpoints/step_*"))


def test_a_task_that_does_not_load_fails_in_one_line(tmp_path):
    """A task found in eval.task_dir whose data file is gone: one line naming it, raised while loading (start-up)."""
    from train.config import EvalSection
    from train.loop.downstream import load_tasks

    write_task(tmp_path)
    (tmp_path / "questions.jsonl").unlink()
    with pytest.raises(ValueError, match=r"^eval\.tasks=shakespeare_next_words does not load: .*questions\.jsonl") as e:
        load_tasks(EvalSection(tasks=["shakespeare_next_words"], task_dir=str(tmp_path)))
    assert "\n" not in str(e.value)
