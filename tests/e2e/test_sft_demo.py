"""The README's fine-tuning demo: the demo's model fine-tuned with +conf=sft_demo on Shakespeare's speeches as
labelled pairs (data_pipeline/sample_pairs.py), then `llm-eval` on the held-out pairs: the answers' loss falls
below the base model's, and the lm-evaluation-harness task over the held-out classes is scored (a shorter run
than the README's: the suite's time budget)."""

import json
import subprocess
from pathlib import Path

import pytest
from helpers import REPO, env, pretrain

pytest.importorskip("lm_eval")
DEMO = REPO / "data" / "demo"  # shared with the other demo tests: tokenizer and shards are built once


def llm_eval(run: Path, *args: str) -> dict:
    out = run / "held.json"
    proc = subprocess.run(["llm-eval", f"checkpoint={run}", f"data=[{DEMO / 'pairs' / 'held'}]", f"out={out}", *args],
                          cwd=run.parent, env={**env(), "HF_DATASETS_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_fine_tuning_demo_lowers_the_held_out_answer_loss(tmp_path):
    base, sft = tmp_path / "outputs" / "debug", tmp_path / "outputs" / "sft_demo"
    base.parent.mkdir()
    pretrain(1, base, f"data.demo_dir={DEMO}", "steps=20", "val_batches=0", torchrun=False)
    proc = pretrain(1, sft, f"data.demo_dir={DEMO}", f"checkpoint.init_from={base}", "epochs=0.25", conf="sft_demo",
                    torchrun=False)
    assert f"initialised weights from {base}" in proc.stderr + proc.stdout
    config = (sft / "config.yaml").read_text()
    assert "format: chat" in config and str(DEMO / "chat_template.jinja") in config  # what export and eval use

    before = llm_eval(base, "format=chat", f"template={DEMO / 'chat_template.jinja'}")
    after = llm_eval(sft, "tasks=[shakespeare_play]", f"task_dir={DEMO / 'pairs' / 'tasks'}")
    assert after["rows"][0]["tokens"] == before["rows"][0]["tokens"] > 0  # the same answers' tokens
    assert after["rows"][0]["loss"] < before["rows"][0]["loss"] - 0.5
    held = (DEMO / "pairs" / "held" / "classify.jsonl").read_text().splitlines()
    task = after["tasks"]["shakespeare_play"]
    assert task["samples"] == len(held) and 0.0 <= task["acc"] <= 1.0
