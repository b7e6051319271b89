"""A run's curves in one PNG, or several runs' overlaid: training loss, each validation set's loss and bits
per byte, learning rate, gradient norm, tokens/s, MFU (TFLOP/s where the peak is unknown), memory, the data
mixture's weights (data.mixing=adaptive) and each lm-eval task's metrics (eval.tasks), all against tokens
seen, with resumes (dashed), rollbacks (the re-done, skipped span shaded) and checkpoints (ticks at the bottom)
marked in the run's colour. Read from each run folder's metrics.jsonl, config.yaml and logs/rank0.log;
`launch/report.py` is the command, and a finished run writes <run>/report.png itself."""

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

VAL_LOSS = re.compile(r"^val[_/].*loss$")  # val_loss, val/<set>/loss
VAL_BPB = re.compile(r"^val[_/].*bpb$")  # val/<set>/bpb
TASK_METRIC = re.compile(r"^eval/(.+)/([^/]+)$")  # eval/<task>/<metric>: lm-eval tasks in the loop (eval.tasks)
RESUMED = re.compile(r"resumed from .* at step (\d+) \((\d+) tokens seen\)")  # train/state/checkpoint.py's log line
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive")
STYLES = ("-", "--", ":", "-.")

log = logging.getLogger("train")


@dataclass
class Run:
    """One run folder's records, each with "tokens" (tokens seen at its step), and its markers in tokens."""

    name: str
    records: list[dict]
    resumes: list[float] = field(default_factory=list)
    rollbacks: list[tuple[float, float]] = field(default_factory=list)  # re-done spans, their data skipped
    checkpoints: list[float] = field(default_factory=list)


def read_records(path: Path) -> list[dict]:
    """metrics.jsonl's records; a line that is not one (cut short by a crash or a full disk, or edited) is left
    out with a warning naming it, since the curves then join the points on either side of the gap."""
    rows, damaged = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
        elif line.strip():
            damaged.append(number)
    if damaged:
        log.warning("%s: left out %d damaged line(s), not a metrics record each: %s %s; the curves join the "
                    "points on either side", path, len(damaged), "lines" if len(damaged) > 1 else "line",
                    line_ranges(damaged))
    return rows


def line_ranges(numbers: list[int], most: int = 10) -> str:
    """Ascending line numbers as "3, 7-9, 12" (the first `most` ranges, then how many more lines)."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans[:most])
    rest = sum(b - a + 1 for a, b in spans[most:])
    return text + (f" and {rest} more" if rest else "")


def run_config(run_dir: Path) -> dict:
    """What the report needs from config.yaml: tokens per step, sequence length, log interval (0 if unknown)."""
    path = run_dir / "config.yaml"
    saved = yaml.safe_load(path.read_text()) if path.is_file() else {}
    seq_len = (saved.get("data") or {}).get("seq_len", 0)
    return {"tokens_per_step": saved.get("global_batch_size", 0) * seq_len, "seq_len": seq_len,
            "log_interval": saved.get("log_interval", 1)}


def add_tokens(records: list[dict], tokens_per_step: int) -> None:
    """Give every record "tokens": its tokens_seen, or (validation, checkpoint, rollback records) the tokens
    seen at its step, counted on from the training record before it at tokens_per_step a step."""
    anchor_step, anchor_tokens = 0, 0
    for r in records:
        if "tokens_seen" in r:
            anchor_step, anchor_tokens = r["step"], r["tokens_seen"]
        per_step = tokens_per_step or (anchor_tokens / anchor_step if anchor_step else 1)
        r["tokens"] = anchor_tokens + (r["step"] - anchor_step) * per_step


def logged_resumes(log_file: Path) -> list[tuple[int, int]]:
    """(step, tokens seen) of every resume rank 0's log names."""
    if not log_file.is_file():
        return []
    return [(int(m[1]), int(m[2])) for m in RESUMED.finditer(log_file.read_text(errors="replace"))]


def resumes(records: list[dict], logged: list[tuple[int, int]], run_cfg: dict) -> list[float]:
    """Tokens seen at each restart: every resume the log names, and every training step that went back with
    no rollback record before it and no logged resume within a log interval before it (a restart with
    checkpoint.resume=none, or a run folder without its log)."""
    found, last, interval = [float(tokens) for _, tokens in logged], None, max(run_cfg["log_interval"], 1)
    for r in records:
        if "rollback_to_step" in r:
            last = r["step"]
        if "loss" not in r:
            continue
        step = r["step"]
        if last is not None and step <= last and not any(s < step <= s + interval for s, _ in logged):
            found.append(max(0.0, r["tokens"] - interval * run_cfg["tokens_per_step"]))
        last = step
    return found


def load_run(run_dir: Path, name: str | None = None) -> Run:
    run_cfg = run_config(run_dir)
    records = read_records(run_dir / "metrics.jsonl")
    add_tokens(records, run_cfg["tokens_per_step"])
    run = Run(name or run_dir.name, records)
    run.checkpoints = [r["tokens"] for r in records if "checkpoint_blocked_s" in r]
    run.rollbacks = [(r["tokens"], r["tokens"] + (r["skipped_samples_end"] - r["skipped_samples_start"])
                      * run_cfg["seq_len"]) for r in records if "rollback_to_step" in r]
    run.resumes = resumes(records, logged_resumes(run_dir / "logs" / "rank0.log"), run_cfg)
    return run


def panels(keys: list[str]) -> list[tuple[str, list[str]]]:
    """(title, keys) of every panel that has something to plot, in the report's order."""
    val_loss = [k for k in keys if VAL_LOSS.match(k)]
    if any(k.startswith("val/") for k in val_loss):
        val_loss = [k for k in val_loss if k.startswith("val/")]  # val_loss repeats the first set's
    speed = ("MFU", ["mfu"]) if "mfu" in keys else ("TFLOP/s per device", ["tflops_per_device"])
    chosen = [("training loss", ["loss"]), ("validation loss", val_loss),
              ("validation bits per byte", [k for k in keys if VAL_BPB.match(k)]), ("learning rate", ["lr"]),
              ("gradient norm", ["grad_norm"]), ("tokens/s", ["tokens_per_s"]), speed,
              ("peak memory (GiB)", ["peak_memory_gib"]),
              ("data mixture weights", [k for k in keys if k.startswith("mixture/")]), *task_panels(keys)]
    return [(title, [k for k in ks if k in keys]) for title, ks in chosen if any(k in keys for k in ks)]


def task_panels(keys: list[str]) -> list[tuple[str, list[str]]]:
    """A panel per lm-eval task of eval.tasks: its metrics (not their standard errors or sample counts)."""
    tasks: dict[str, list[str]] = {}
    for key in keys:
        match = TASK_METRIC.match(key)
        if match and match[2] != "samples" and not match[2].endswith("_stderr"):
            tasks.setdefault(match[1], []).append(key)
    return [(f"{task} (lm-eval)", metrics) for task, metrics in tasks.items()]


def pieces(points: list[tuple[float, float]]) -> list[tuple[list, list]]:
    """The points split where the tokens go back (a rollback or a restart re-did them): (xs, ys) each."""
    out: list[tuple[list, list]] = []
    for x, y in points:
        if not out or x <= out[-1][0][-1]:
            out.append(([], []))
        out[-1][0].append(x)
        out[-1][1].append(y)
    return out


def final(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points nothing later re-did (no later point at the same or fewer tokens): the curve as it stands."""
    out, low = [], math.inf
    for x, y in reversed(points):
        if x < low:
            out.append((x, y))
        low = min(low, x)
    return out[::-1]


def draw(ax, run: Run, key: str, color: str, style: str) -> None:
    """One run's curve of one key, as it stands; what a rollback or a restart re-did is drawn faded beneath."""
    points = [(r["tokens"], r[key]) for r in run.records if isinstance(r.get(key), (int, float))]
    if not points:
        return
    parts = pieces(points)
    for xs, ys in parts if len(parts) > 1 else []:
        ax.plot(xs, ys, color=color, linestyle=style, linewidth=1, alpha=0.35)
    xs, ys = zip(*final(points))
    ax.plot(xs, ys, color=color, linestyle=style, linewidth=1.3, marker="o" if len(xs) < 30 else None,
            markersize=2.5)


def mark(ax, run: Run, color: str) -> None:
    """Rollbacks shaded, resumes dashed, checkpoints as ticks at the bottom."""
    for start, end in run.rollbacks:
        ax.axvspan(start, end, color=color, alpha=0.15, linewidth=0)
    for x in run.resumes:
        ax.axvline(x, color=color, linestyle="--", linewidth=1)
    if run.checkpoints:
        ax.vlines(run.checkpoints, 0, 0.06, transform=ax.get_xaxis_transform(), color=color, linewidth=1.5)


def panel(ax, title: str, keys: list[str], runs: list[Run]) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.ticker import EngFormatter

    for i, run in enumerate(runs):
        for key, style in zip(keys, STYLES * len(keys)):
            draw(ax, run, key, COLORS[i % len(COLORS)], style)
        mark(ax, run, COLORS[i % len(COLORS)])
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("tokens seen", fontsize=8)
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if len(keys) > 1:  # several validation sets: a line style each
        sets = [Line2D([], [], color="black", linestyle=style, label=line_label(key))
                for key, style in zip(keys, STYLES * len(keys))]
        ax.legend(handles=sets, fontsize=7)


def line_label(key: str) -> str:
    """A line's name in a panel's legend: the validation set of val/<set>/<figure>, the metric of
    eval/<task>/<metric>, else the key."""
    if TASK_METRIC.match(key):
        return key.rsplit("/", 1)[1]
    return key.split("/")[1] if key.count("/") == 2 else key


def legend(fig, runs: list[Run]) -> None:
    """The runs by colour, and what the markers mean (those that appear)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Line2D([], [], color=COLORS[i % len(COLORS)], label=run.name) for i, run in enumerate(runs)]
    if any(run.resumes for run in runs):
        handles.append(Line2D([], [], color="gray", linestyle="--", label="resume"))
    if any(run.rollbacks for run in runs):
        handles.append(Patch(color="gray", alpha=0.3, label="rollback (re-done, data skipped)"))
    if any(run.checkpoints for run in runs):
        handles.append(Line2D([], [], color="gray", marker="|", linestyle="", markersize=8, label="checkpoint"))
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 4), fontsize=9, frameon=False)


def figure(runs: list[Run]):
    """The report's matplotlib Figure (no pyplot: no global state, the Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = list(dict.fromkeys(k for run in runs for r in run.records for k in r))
    chosen = panels(keys)
    if not chosen:
        raise ValueError(f"nothing to draw: no training or validation records in {', '.join(r.name for r in runs)}")
    rows = (len(chosen) + 1) // 2
    height = 2.8 * rows + 0.5  # inches; fixed margins (a layout engine would double the drawing time)
    fig = Figure(figsize=(12, height), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.5 / height, top=1 - 0.55 / height, hspace=0.5, wspace=0.2)
    axes = list(fig.subplots(rows, 2, squeeze=False).flat)
    end = max(r["tokens"] for run in runs for r in run.records)
    for ax, (title, panel_keys) in zip(axes, chosen):
        panel(ax, title, panel_keys, runs)
        ax.set_xlim(0, end * 1.02 or 1)  # the same tokens axis in every panel
    for ax in axes[len(chosen):]:
        ax.set_visible(False)
    legend(fig, runs)
    return fig


def names(run_dirs: list[Path]) -> list[str]:
    """Each run's label: its folder's name, or its whole path where two runs' folders share a name."""
    short = [d.name or str(d) for d in run_dirs]
    return [n if short.count(n) == 1 else str(d) for n, d in zip(short, run_dirs)]


def write_report(run_dirs: list[Path], out: Path) -> Path:
    """Draw the runs into the PNG `out` (written whole, then renamed into place); returns its path."""
    runs = [load_run(d, name) for d, name in zip(run_dirs, names(run_dirs))]
    if not any(run.records for run in runs):
        raise ValueError(f"nothing to draw: no records in {', '.join(str(d / 'metrics.jsonl') for d in run_dirs)}")
    fig = figure(runs)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(out)
    return out
