"""TensorBoard and the report through the real entry point: the event files hold every record of
metrics.jsonl, read back with TensorBoard's own reader; report.png, written at the end of a run and by
launch/report.py, has a curve in every panel and the run's resume and rollback where they happened; a
TensorBoard or a report that fails is one warning, never a failed run."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, TINY, env, pretrain, tiny_data

B, SEQ = 4, 64  # global batch and sequence length: tokens seen at step s are s x B x SEQ
BASE = [*TINY, f"global_batch_size={B}", f"data.seq_len={SEQ}", f"micro_batch_size={B}", "checkpoint.interval=5",
        "val_interval=4", "stability.min_history=4", "stability.window=4", "stability.spike_z=3",
        "tensorboard.enabled=true", "report=true"]
SPIKE = {"spike_data_steps": [8]}  # random tokens at step 8 (tests/support/fault_drills.py)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory)


@pytest.fixture(scope="module")
def spiked(tmp_path_factory, data) -> Path:
    """12 steps whose step 8 sees random tokens (a spike, rolled back to the step-5 checkpoint), then the same
    run to step 14, resumed from its step-10 checkpoint: steps 11 and 12 are done twice."""
    run = tmp_path_factory.mktemp("report") / "spiked"
    first = pretrain(1, run, *BASE, *data, "steps=12", torchrun=False, drills=SPIKE)
    assert "rolled back to step_00000005 (step 5)" in first.stdout
    second = pretrain(1, run, *BASE, *data, "steps=14", torchrun=False, drills=SPIKE)
    assert "step_00000010 at step 10" in second.stdout
    assert f"report: {run / 'report.png'}" in second.stdout
    return run


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_has_every_record(spiked):
    """Every number of every record, at the record's step, in the order written, over both processes' files
    (TensorBoard's reader told not to drop the steps a rollback or the resume re-did)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list((spiked / "tensorboard").glob("events.out.tfevents.*"))) == 2
    events = EventAccumulator(str(spiked / "tensorboard"), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    events.Reload()
    written = records(spiked)
    keys = {k for r in written for k in r if k != "step"}
    assert {"loss", "val/val/loss", "rollback_to_step", "checkpoint_blocked_s"} <= keys
    assert set(events.Tags()["scalars"]) == keys
    for key in keys:
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in written if key in r], key


def png_and_panels(run_dirs: list[Path], png: Path):
    """The PNG's RGB pixels, and the report's axes (the same figure, drawn again), to find each panel's pixels."""
    from matplotlib.image import imread

    from train.observe.report import figure, load_run, names

    fig = figure([load_run(d, n) for d, n in zip(run_dirs, names(run_dirs))])
    return imread(png)[..., :3], fig, [ax for ax in fig.axes if ax.get_visible()]


def crop(pixels: np.ndarray, ax, inset: int = 3) -> np.ndarray:
    """The pixels inside one panel's frame (the PNG's rows run top down)."""
    box, height = ax.get_window_extent(), pixels.shape[0]
    return pixels[int(height - box.y1) + inset:int(height - box.y0) - inset, int(box.x0) + inset:int(box.x1) - inset]


def column(pixels: np.ndarray, ax, tokens: float) -> np.ndarray:
    """The panel's pixel column at `tokens` on its x axis."""
    x = int(round(ax.transData.transform((tokens, 0))[0] - ax.get_window_extent().x0)) - 3
    return crop(pixels, ax)[:, x]


def coloured(pixels: np.ndarray) -> np.ndarray:
    """Pixels of a curve or a marker: saturated, not the white, grey and black of the frame, grid and text."""
    return pixels.max(axis=-1) - pixels.min(axis=-1) > 0.3


def test_report_has_a_curve_in_every_panel_and_marks_the_resume_and_the_rollback(spiked):
    pixels, fig, axes = png_and_panels([spiked], spiked / "report.png")
    assert pixels.shape[1] >= 1000 and pixels.shape[0] >= 800  # 8 panels, 2 a row
    titles = [ax.get_title() for ax in axes]
    assert titles[:2] == ["training loss", "validation loss"] and "learning rate" in titles and len(axes) == 8
    rollback = next(r for r in records(spiked) if "rollback_to_step" in r)
    shaded = (rollback["rollback_to_step"] * B * SEQ, rollback["skipped_samples_end"] * SEQ)  # steps 5 to 8
    resume = 10 * B * SEQ
    for ax in axes:
        panel = crop(pixels, ax)
        assert coloured(panel).sum() > 400, ax.get_title()  # a curve, not an empty frame
        assert coloured(column(pixels, ax, resume)).mean() > 0.4, ax.get_title()  # the dashed line
        for tokens in np.linspace(*shaded, 6)[1:-1]:  # tinted from top to bottom
            assert (column(pixels, ax, tokens) < 0.97).any(axis=-1).mean() > 0.9, ax.get_title()
        outside = column(pixels, ax, shaded[0] / 2 + 7)
        assert (outside < 0.97).any(axis=-1).mean() < 0.3 and coloured(outside).mean() < 0.1, ax.get_title()


def test_report_of_two_runs_overlaid_by_the_command(spiked, tmp_path, data):
    """launch/report.py draws two runs into --out, a colour and a legend entry each; the second run, 2 steps
    with a TensorBoard folder that cannot be made (a file is in the way), warns once and trains on."""
    plain = tmp_path / "plain"
    (tmp_path / "a_file").write_text("")
    proc = pretrain(1, plain, *TINY, *data, "steps=2", "val_batches=0", "tensorboard.enabled=true",
                    f"tensorboard.dir={tmp_path / 'a_file' / 'tb'}", torchrun=False)
    warnings = [line for line in (plain / "logs" / "rank0.log").read_text().splitlines() if "TensorBoard" in line]
    assert len(warnings) == 1 and f"cannot write to {tmp_path / 'a_file' / 'tb'}" in warnings[0], warnings
    assert "tensorboard.dir" in warnings[0] and "Traceback" not in proc.stdout + proc.stderr
    assert [r["step"] for r in records(plain) if "loss" in r] == [1, 2]
    out = tmp_path / "both.png"
    # A copy of spiked whose metrics.jsonl has lines 3, 4 and 7 damaged (torn, zeros, not a record): each named.
    spiked = shutil.copytree(spiked, tmp_path / "spiked", ignore=shutil.ignore_patterns("checkpoints", "tb*"))
    metrics = spiked / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[2], lines[3], lines[6] = lines[2][:9], "\x00\x00", "[1, 2]"
    metrics.write_text("\n".join(lines) + "\n")
    done = subprocess.run([sys.executable, str(REPO / "launch" / "report.py"), str(spiked), str(plain), "--out",
                           str(out)], env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == str(out), done.stderr
    assert f"warning: {metrics}: left out 3 damaged line(s), not a metrics record each: lines 3-4, 7;" in done.stderr
    pixels, fig, axes = png_and_panels([spiked, plain], out)
    assert [t.get_text() for t in fig.legends[0].get_texts()][:2] == ["spiked", "plain"]
    curves = {tuple(line.get_color()) if isinstance(line.get_color(), tuple) else line.get_color()
              for line in axes[0].get_lines() if len(line.get_xdata()) > 1}
    assert len(curves) == 2  # one colour a run
    assert coloured(crop(pixels, axes[0])).sum() > 400


@pytest.mark.parametrize("what", ["missing", "empty"])
def test_report_of_a_folder_that_is_not_a_run_is_one_line(tmp_path, what):
    folder = tmp_path / "run"
    if what == "empty":
        folder.mkdir()
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "report.py"), str(folder)], env=env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {folder}: ") and proc.stderr.count("\n") == 1
    assert ("no such run folder" if what == "missing" else "no metrics.jsonl") in proc.stderr


def test_sinks_without_tensorboard_warn_once_and_write_the_jsonl(tmp_path, monkeypatch, caplog):
    """No tensorboard package (its import fails as when it is not installed): one warning with the fix."""
    from train.config import TensorBoardSection, WandbSection
    from train.observe.metrics import MetricSinks

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` of it raises ImportError
    monkeypatch.setattr(logging.getLogger("train"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="train"):
        sinks = MetricSinks(tmp_path, True, WandbSection(mode="disabled"), TensorBoardSection(enabled=True), {}, None)
        sinks.write({"step": 1, "loss": 2.5})
        sinks.close()
    assert len(caplog.records) == 1 and "pip install 'tensorboard" in caplog.records[0].getMessage()
    assert records(tmp_path) == [{"step": 1, "loss": 2.5}] and not (tmp_path / "tensorboard").exists()


def test_a_report_that_fails_is_one_warning(tmp_path, monkeypatch, caplog):
    """The end of a run whose records cannot be drawn (here: none) warns and returns."""
    from train.loop.job import write_report

    (tmp_path / "metrics.jsonl").write_text("")
    monkeypatch.setattr(logging.getLogger("train"), "propagate", True)
    with caplog.at_level(logging.INFO, logger="train"):
        write_report(tmp_path)
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "report not written" in caplog.text
    assert not (tmp_path / "report.png").exists()
