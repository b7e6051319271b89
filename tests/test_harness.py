"""lm-evaluation-harness through `launch/eval.py tasks=...`: a 20-question multiple-choice task defined
locally (a task YAML over a local jsonl file: hub datasets are unreachable offline) gives an accuracy, and
each per-sample log-likelihood equals minus our own summed loss over the same tokens."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, TINY, env, pretrain, tiny_data

pytest.importorskip("lm_eval")

TASK = """task: shakespeare_next_words
dataset_path: json
dataset_kwargs:
  data_files:
    test: {questions}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("harness") / "run"
    pretrain(1, run, *TINY, *tiny_data(tmp_path_factory), "steps=8", "checkpoint.save_final=true", torchrun=False)
    return run


def write_task(folder: Path) -> Path:
    """20 lines of a play: the first four words, and as choices the line's own rest and three other lines'."""
    from data_pipeline.sample_corpus import sample_corpus_dir

    text = sorted(sample_corpus_dir().glob("*.txt"))[0].read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if len(line.split()) >= 8 and not line.isupper()]
    rng = random.Random(0)
    with open(folder / "questions.jsonl", "w") as f:
        for line in lines[:20]:
            words, others = line.split(), rng.sample(lines[20:], 3)
            choices = [" ".join(words[4:])] + [" ".join(o.split()[4:]) for o in others]  # lm-eval puts " " before
            rng.shuffle(choices)
            f.write(json.dumps({"question": " ".join(words[:4]), "choices": choices,
                                "answer": choices.index(" ".join(words[4:]))}) + "\n")
    (folder / "next_words.yaml").write_text(TASK.format(questions=folder / "questions.jsonl"))
    return folder


def our_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Minus the model's summed training loss of the continuation's tokens after BOS + context."""
    ctx = [tok.bos_id, *tok.encode(context)]
    cont = tok.encode(context + continuation)[len(ctx) - 1:]
    ids = torch.tensor([ctx + cont])
    labels = torch.full_like(ids, -100)
    labels[0, len(ctx) - 1:-1] = torch.tensor(cont)  # position t's label is token t + 1: the continuation's
    with torch.no_grad():
        return -float(model(ids[:, :-1], labels=labels[:, :-1]))


def test_local_multiple_choice_task(run, tmp_path):
    from launch.generate import load_model, open_tokenizer
    from train.offline_checkpoint import find_checkpoint

    tasks, out = write_task(tmp_path), tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "eval.py"), f"checkpoint={run}",
                           "tasks=[shakespeare_next_words]", f"task_dir={tasks}", f"out={out}"],
                          cwd=tmp_path, env={**env(), "HF_DATASETS_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())["tasks"]["shakespeare_next_words"]
    assert 0 <= result["acc"] <= 1 and result["samples"] == 20
    assert "shakespeare_next_words" in proc.stdout and "acc" in proc.stdout

    samples = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    assert len(samples) == 20 * 4
    source = find_checkpoint(run)
    tok = open_tokenizer({"path": str(run)}, source)
    model = load_model(source, torch.device("cpu"))
    for s in samples:
        ours = our_loglikelihood(model, tok, *s["arguments"])
        assert s["loglikelihood"] == pytest.approx(ours, abs=1e-4), s
    right = sum(max(range(4), key=lambda i, d=d: samples[4 * d + i]["loglikelihood"]) == samples[4 * d]["target"]
                for d in range(20))
    assert result["acc"] == pytest.approx(right / 20)  # the accuracy is the argmax of those log-likelihoods
