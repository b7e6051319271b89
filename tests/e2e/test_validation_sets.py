"""Several named validation sets through the real entry point: each set's loss, perplexity and bits per
byte on every sink (metrics.jsonl, W&B offline read back from its .wandb file, TensorBoard read back from
its event file); bits per byte counted by hand; a validation set that is not there fails in one line."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY, pretrain, tiny_data, wandb_history

from train.loop.validation import bits_per_byte, label_bytes

SETS = ("held", "seen")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory)


@pytest.fixture(scope="module")
def run(tmp_path_factory, data) -> Path:
    """4 steps validated at steps 2 and 4 on the shard set's val split ("held") and its train split ("seen")."""
    shards = data[2].split("=", 1)[1].strip("[]")
    run = tmp_path_factory.mktemp("val_sets") / "run"
    pretrain(1, run, *TINY, *data, "steps=4", "val_interval=2", "wandb.mode=offline", "tensorboard.enabled=true",
             f"+data.val_sets={{held:'{shards}',seen:'{shards}:train'}}", torchrun=False)
    return run


def val_records(rows: list[dict]) -> list[dict]:
    """The validation records, their figures and step (not their timing, val_s)."""
    return [{k: v for k, v in r.items() if k.startswith("val") and k != "val_s" or k == "step"}
            for r in rows if "val_loss" in r]


def test_each_set_has_loss_perplexity_and_bits_per_byte(run):
    rows = val_records(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        for name in SETS:
            loss = r[f"val/{name}/loss"]
            assert r[f"val/{name}/perplexity"] == pytest.approx(math.exp(loss))
            assert 0 < r[f"val/{name}/bpb"] < loss / math.log(2)  # tokens average more than one byte
        assert r["val_loss"] == r["val/held/loss"]  # the first set is the headline figure
        assert r["val/seen/loss"] != r["val/held/loss"]  # two sets, not one twice
    assert rows[1]["val/held/loss"] < rows[0]["val/held/loss"]
    log = (run / "logs" / "rank0.log").read_text()
    assert all(f"bits/byte ({name})" in log for name in SETS)


def test_wandb_and_tensorboard_have_every_set(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    written = val_records(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    assert val_records(wandb_history(run)) == written
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for key in [k for k in written[0] if k != "step"]:
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in written], key


def test_bits_per_byte_counted_by_hand(data):
    """The bytes of each label are the UTF-8 bytes of the text its token stands for, whatever it splits."""
    from data_pipeline.tokenizer import Tokenizer

    tok = Tokenizer(data[1].split("=", 1)[1])
    text = "Thou art más fair — 日本"  # multi-byte characters fall back to byte pieces in a 512-piece vocabulary
    ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
    table, dummy_prefix = tok.token_bytes()
    inputs, labels = np.array([ids[:-1]]), np.array([ids[1:]])
    assert label_bytes(inputs, labels, table, dummy_prefix, tok.bos_id) == len(text.encode("utf-8"))
    labels[0, :3] = -100  # ignored labels count no bytes
    skipped = len(tok.decode(ids[1:4]).encode("utf-8"))
    assert label_bytes(inputs, labels, table, dummy_prefix, tok.bos_id) == len(text.encode("utf-8")) - skipped
    assert bits_per_byte(100 * math.log(2), 50) == 2.0


def test_a_validation_set_that_is_not_there_fails_naming_its_key(tmp_path, data):
    proc = pretrain(1, tmp_path / "run", *TINY, *data, f"+data.val_sets.moby={tmp_path / 'nope'}", check=False,
                    torchrun=False)
    assert proc.returncode != 0
    assert f"error (rank 0): data.val_sets.moby={tmp_path / 'nope'}: " in proc.stderr and "Traceback" not in proc.stderr


def test_a_misspelt_split_is_answered_in_the_folder_split_syntax(tmp_path, data):
    shards = data[2].split("=", 1)[1].strip("[]")
    proc = pretrain(1, tmp_path / "run", *TINY, *data, f"+data.val_sets.seen={shards}:trian", check=False,
                    torchrun=False)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert f"has no 'trian' split with tokens (it has: train, val); write +data.val_sets.seen={shards}:train" \
        in proc.stderr, proc.stderr
