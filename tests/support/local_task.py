"""A local lm-eval task for the tests (hub datasets are unreachable offline): a task YAML over a jsonl of 20
multiple-choice questions on a play's lines (tests/train/evaluation/test_harness.py says what they check)."""

import json
import random
from pathlib import Path

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
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_task(folder: Path) -> list[dict]:
    """20 lines of a play: the first four words, and as choices the line's own rest and three other lines'. The
    space between them ends the question in even questions and starts each choice in odd ones (no delimiter is
    added: target_delimiter ""). Writes the task YAML to folder; returns the questions."""
    from data_pipeline.sample_corpus import sample_corpus_dir

    text = sorted(sample_corpus_dir().glob("*.txt"))[0].read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if len(line.split()) >= 8 and not line.isupper()]
    rng, questions = random.Random(0), []
    for i, line in enumerate(lines[:20]):
        head, rests = " ".join(line.split()[:4]), [" ".join(o.split()[4:]) for o in [line, *rng.sample(lines[20:], 3)]]
        question, choices = (head + " ", rests) if i % 2 == 0 else (head, [" " + r for r in rests])
        answer = choices[0]
        rng.shuffle(choices)
        questions.append({"question": question, "choices": choices, "answer": choices.index(answer)})
    with open(folder / "questions.jsonl", "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in questions)
    (folder / "next_words.yaml").write_text(TASK.format(questions=folder / "questions.jsonl"))
    return questions


OPEN_TASKS = """task: next_words_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {questions}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
---
task: next_words_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {questions}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{question}}}}"
metric_list:
  - metric: bits_per_byte
"""


def write_open_tasks(folder: Path) -> list[str]:
    """Beside write_task's questions: a greedy-generation task (the line's rest after its first words) and a rolling
    log-likelihood one (the question's text); returns their names."""
    for text, name in zip(OPEN_TASKS.split("---\n"), ("gen", "rolling")):
        (folder / f"next_words_{name}.yaml").write_text(text.format(questions=folder / "questions.jsonl"))
    return ["next_words_gen", "next_words_rolling"]
