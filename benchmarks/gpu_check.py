"""The GPU check in one command: this trainer next to torchtitan 0.2.2 on one GPU, row by row.

    python benchmarks/gpu_check.py prepare .gpu_kit          # on the CPU, once: everything the GPU run needs
    python benchmarks/gpu_check.py run .gpu_kit OUT           # on the GPU machine (budget 450 s by default)
    python benchmarks/gpu_check.py run .gpu_kit OUT --dry-run # the same steps on the CPU: debug model, no torchtitan

`prepare` copies ../shared/bench/torchtitan and the GPU machine's wheels into the kit (a git-ignored
folder the GPU call carries along) and builds shards of ../shared/corpora with torchtitan's own
tokenizer, so both sides read the same text through the same tokenizer; nothing is built on the GPU.
`run` installs the wheels the machine lacks, then runs ROWS in order of importance. Each finished row
is appended to OUT/results.jsonl and OUT/results.md is rewritten at once, so a call cut short keeps
what it measured; a row that no longer fits the time left is skipped and recorded as such. Our runs are
benchmarks/bench.py (medians over steps 11-30; step 31 runs under torch.profiler, its summary goes to OUT),
torchtitan's its own tt_bench.sh (median over steps 10-30); the logs go to OUT/logs. The GPU machine may hold
the checkout without the package installed: `run` does its work in child processes whose PYTHONPATH names the
checkout.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
CONF = {"1B": "bench_1b", "8B_L8": "bench_8b_l8"}  # torchtitan's flavors -> our presets of the same shape
PRESET = {"1B": "tt_1b", "8B_L8": "tt_8b_l8"}
STEPS = 31  # 10 warm-up, 20 measured, the last profiled
# The dry run's model and steps: the debug preset made tiny, sequences 128x shorter, no compile.
DRY = ("+conf=debug", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "log_interval=1",
       "val_batches=0", "wandb.mode=disabled", "checkpoint.save_final=false", "sample_prompt=''", "data.demo=false")
DRY_STEPS = 13


@dataclass(frozen=True)
class Row:
    name: str
    shape: str  # torchtitan's flavor: 1B or 8B_L8
    batch: int
    seq: int
    ac: str = "none"
    float8: str = "none"
    torchtitan: bool = True  # also run torchtitan's side
    compare_to: str = ""  # a row whose ours this row's ours is set against (instead of torchtitan)
    extra: tuple[str, ...] = ()
    needs_s: int = 60  # do not start with less time left than this


# In order of importance: the two ratio targets, document masking against causal, the other two memory
# peaks `llm-plan --validate` checks, then float8 on both sides (only where torchao is installed), then
# cpu_offload against the first row.
ROWS = (
    Row("1B 2x8192", "1B", 2, 8192, needs_s=120),
    Row("8B_L8 1x8192 selective AC", "8B_L8", 1, 8192, ac="selective", needs_s=120),
    Row("1B 2x8192 document masking", "1B", 2, 8192, torchtitan=False, compare_to="1B 2x8192",
        extra=("data.document_masking=true",)),
    Row("1B 8x2048", "1B", 8, 2048, torchtitan=False),
    Row("8B_L8 1x8192", "8B_L8", 1, 8192, torchtitan=False),
    Row("8B_L8 1x8192 selective AC float8", "8B_L8", 1, 8192, ac="selective", float8="tensorwise", needs_s=120),
    # parallel.cpu_offload's step time and GPU peak against the same row without it: the 1B shape, which runs in
    # seconds (its 1.2B parameters' fp32 state, 20 GB, on the host); what 8B on one GPU would cost, llm-plan says.
    Row("1B 2x8192 cpu_offload", "1B", 2, 8192, torchtitan=False, compare_to="1B 2x8192",
        extra=("parallel.cpu_offload=true",)),
)


def prepare(kit: Path) -> None:
    """Copy torchtitan's bench and the wheels from ../shared, then build shards with its tokenizer."""
    from data_pipeline.build import build_shards
    from data_pipeline.tokenizer import Tokenizer

    for need in (SHARED / "bench" / "torchtitan", SHARED / "wheels" / "gpu-py312", SHARED / "corpora"):
        if not need.is_dir():
            sys.exit(f"error: {need} is missing: prepare copies it from ../shared beside the checkout")
    shutil.rmtree(kit, ignore_errors=True)
    shutil.copytree(SHARED / "bench" / "torchtitan", kit / "torchtitan")
    shutil.copytree(SHARED / "wheels" / "gpu-py312", kit / "wheels", ignore=shutil.ignore_patterns("*.md"))
    shutil.copytree(kit / "torchtitan" / "tok", kit / "tokenizer")  # tokenizer.json with its BOS/EOS config
    corpora = SHARED / "corpora"
    build_shards([str(corpora / "sotu.jsonl"), str(corpora / "shakespeare"), str(corpora / "moby_dick.txt")],
                 kit / "shards", Tokenizer(kit / "tokenizer"), val_fraction=0.0, progress=False)
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True)
    (kit / "commit.txt").write_text(commit.stdout.strip() or "unknown")
    print(f"kit ready in {kit} ({sum(f.stat().st_size for f in kit.rglob('*') if f.is_file()) / 2**20:.0f} MiB)")


# -- one side of a row -----------------------------------------------------------------------------
def ours_cmd(row: Row, kit: Path, work: Path, dry: bool) -> list[str]:
    steps = DRY_STEPS if dry else STEPS
    seq = row.seq // 128 if dry else row.seq
    head = list(DRY) if dry else [f"+conf={CONF[row.shape]}"]
    return [sys.executable, str(REPO / "benchmarks" / "bench.py"), *head, f"global_batch_size={row.batch}",
            f"micro_batch_size={row.batch}", f"data.seq_len={seq}", f"parallel.activation_checkpointing={row.ac}",
            f"parallel.float8={row.float8}", f"data.tokenizer={tokenizer(kit)}", f"data.shards=[{kit / 'shards'}]",
            f"steps={steps}", f"profile_step={steps}", f"hydra.run.dir={work}", *row.extra]


def theirs_cmd(row: Row, kit: Path) -> list[str]:
    float8 = [] if row.float8 == "none" else [
        "--model.converters", "quantize.linear.float8", "--quantize.linear.float8.recipe_name", row.float8,
        "--quantize.linear.float8.filter_fqns", "output"]
    return ["bash", str(kit / "torchtitan" / "tt_bench.sh"), row.shape, str(row.batch), str(row.seq),
            "--compile.enable", row.ac, *float8]


def tokenizer(kit: Path) -> Path:
    found = [p for p in (kit / "tokenizer", kit / "tokenizer.model") if p.exists()]
    if not found or not (kit / "shards").is_dir():
        sys.exit(f"error: {kit} holds no tokenizer or no shards: run "
                 f"`python benchmarks/gpu_check.py prepare {kit}` first")
    return found[0]


def run_side(cmd: list[str], log: Path, timeout_s: float, env: dict) -> tuple[str, float]:
    """(the stdout's last line, or an error line; seconds taken)."""
    t0 = time.monotonic()
    try:
        with open(log, "w") as out:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=out, text=True, timeout=timeout_s, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        last = lines[-1] if lines else ""
        if proc.returncode != 0 and "FAILED" not in last:
            errors = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("error")]
            last = f"FAILED rc={proc.returncode}: {(errors or ['see ' + log.name])[-1][:300]}"
    except subprocess.TimeoutExpired:
        last = f"FAILED: timed out after {timeout_s:.0f} s"
    return last, time.monotonic() - t0


def figures(line: str) -> dict:
    """key=value figures of a BENCH or TORCHTITAN line (torchtitan says tps and mem_gib)."""
    if "FAILED" in line or not line:
        return {"error": line or "no output"}
    pairs = dict(re.findall(r"(\w+)=([\d.]+)%?", line))
    rename = {"tps": "tokens_per_s", "mem_gib": "peak_mem_gib"}
    return {rename.get(k, k): float(v) for k, v in pairs.items() if k in
            ("tokens_per_s", "tps", "tflops", "mfu", "peak_mem_gib", "mem_gib")}


# -- rows ------------------------------------------------------------------------------------------
class Results:
    """OUT/results.jsonl (a record per row, appended as it ends) and OUT/results.md (rewritten each time)."""

    def __init__(self, out: Path, header: str):
        self.out, self.header, self.records = out, header, []
        (out / "logs").mkdir(parents=True, exist_ok=True)
        (out / "results.jsonl").unlink(missing_ok=True)

    def add(self, record: dict) -> None:
        self.records.append(record)
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        (self.out / "results.md").write_text(self.table())
        print(f"ROW {json.dumps(record)}", flush=True)

    def ours(self, name: str) -> dict:
        return next((r.get("ours", {}) for r in self.records if r["row"] == name), {})

    def table(self) -> str:
        lines = [self.header, "", "| row | ours tokens/s | MFU | peak GiB (planned) | torchtitan tokens/s | MFU "
                 "| peak GiB | ratio | seconds |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
        for r in self.records:
            if "skipped" in r:
                lines.append(f"| {r['row']} | skipped: {r['skipped']} | | | | | | | |")
                continue
            o, t = r["ours"], r.get("torchtitan") or {}
            seconds = o.get("seconds", 0) + t.get("seconds", 0)
            lines.append(f"| {r['row']} | {cell(o, 'tokens_per_s')} | {cell(o, 'mfu', '%')} | "
                         f"{cell(o, 'peak_mem_gib')} ({cell(r, 'planned_gib')}) | {cell(t, 'tokens_per_s')} | "
                         f"{cell(t, 'mfu', '%')} | {cell(t, 'peak_mem_gib')} | {r.get('ratio', '')} | {seconds:.0f} |")
        return "\n".join(lines) + "\n"


def cell(figs: dict, key: str, unit: str = "") -> str:
    if "error" in figs:
        return figs["error"][:120].replace("|", "/")
    if "skipped" in figs:
        return figs["skipped"]
    value = figs.get(key)
    return "" if value is None else f"{value:,.0f}{unit}" if value >= 100 else f"{value:.1f}{unit}"


def slug_of(row: Row) -> str:
    return re.sub(r"\W+", "_", row.name)


def planned_gib(row: Row) -> float:
    """What llm-plan predicts for this row's peak on one GPU."""
    from model import preset
    from train.planner.plan import Hardware, Layout, plan

    offload = "parallel.cpu_offload=true" in row.extra
    return round(plan(preset(PRESET[row.shape]), Layout(), row.batch, row.seq, row.ac, Hardware(),
                      float8=row.float8 != "none", cpu_offload=offload)["total_gib"], 1)


def planned_gibs(env: dict) -> dict[str, float]:
    """planned_gib of every row, by name, asked of a child process that finds the checkout through env's
    PYTHONPATH (this one runs from the checkout's benchmarks/ folder, which may not be installed)."""
    ask = (f"import json, runpy; tool = runpy.run_path({str(Path(__file__).resolve())!r}); "
           "print(json.dumps({row.name: tool['planned_gib'](row) for row in tool['ROWS']}))")
    done = subprocess.run([sys.executable, "-c", ask], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(row: Row, kit: Path, out: Path, deadline: float, env: dict, results: Results,
            planned: dict[str, float] | None) -> dict:
    """One row: ours, then torchtitan's side or the row it is compared to; planned None: the dry run."""
    dry = planned is None
    slug = slug_of(row)
    work = Path("/tmp/gpu_check") / slug  # not under OUT: the profiler's trace is large
    line, seconds = run_side(ours_cmd(row, kit, work, dry), out / "logs" / f"ours_{slug}.log",
                             deadline - time.monotonic(), env)
    record = {"row": row.name, "ours": {**figures(line), "seconds": round(seconds)}}
    if (work / "profile" / "summary_rank0.txt").is_file():
        shutil.copy(work / "profile" / "summary_rank0.txt", out / f"profile_{slug}.txt")
    if not dry:
        record["planned_gib"] = planned[row.name]
    if row.torchtitan:
        record["torchtitan"] = {"skipped": "dry run"} if dry else theirs(row, kit, out, deadline, env)
    base = record.get("torchtitan") if row.torchtitan else results.ours(row.compare_to)
    if base and base.get("tokens_per_s") and record["ours"].get("tokens_per_s"):
        against = "torchtitan" if row.torchtitan else row.compare_to
        record["ratio"] = f"{record['ours']['tokens_per_s'] / base['tokens_per_s']:.3f}x vs {against}"
    return record


def theirs(row: Row, kit: Path, out: Path, deadline: float, env: dict) -> dict:
    left = deadline - time.monotonic()
    if left < 45:
        return {"skipped": f"{left:.0f} s left"}
    line, seconds = run_side(theirs_cmd(row, kit), out / "logs" / "tt_bench.out", left, env)
    return {**figures(line), "seconds": round(seconds)}


def skip_reason(row: Row, left: float, torchao: bool) -> str:
    if left < row.needs_s:
        return f"{left:.0f} s left, the row needs about {row.needs_s}"
    if row.float8 != "none" and not torchao:
        return "torchao is not installed"
    return ""


# -- the machine -----------------------------------------------------------------------------------
def child_env(kit: Path, out: Path) -> dict:
    """The environment of both sides: the checkout on PYTHONPATH (the machine may not have it installed), and
    the kit's wheels installed where the machine lacks them."""
    import os

    checkout = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "LOG_DIR": str(out / "logs"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": checkout}
    if not importable("hydra, omegaconf", env):
        site = Path("/tmp/gpu_check_site")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(site), *map(str, sorted((kit / "wheels").glob("*.whl")))], check=True)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return env


def importable(modules: str, env: dict) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {modules}"], env=env, capture_output=True).returncode == 0


def header(kit: Path, env: dict) -> str:
    """The device, torch and commit measured. Asked of a child process: a CUDA context in this one would
    hold GPU memory through every row."""
    ask = "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU', torch.__version__)"
    device = subprocess.run([sys.executable, "-c", ask], env=env, capture_output=True, text=True).stdout.strip()
    commit = (kit / "commit.txt").read_text().strip() if (kit / "commit.txt").is_file() else "unknown"
    return f"# GPU check: {device}, commit {commit}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"


def run(kit: Path, out: Path, budget_s: float, dry: bool, names: list[str]) -> None:
    deadline = time.monotonic() + budget_s
    unknown = [n for n in names if n not in {row.name for row in ROWS}]
    if unknown:
        sys.exit(f"error: --rows names {unknown[0]!r}, which is none of: {', '.join(row.name for row in ROWS)}")
    tokenizer(kit)  # fails now, in one line, on a kit that was not prepared
    env = child_env(kit, out)
    results = Results(out, header(kit, env))
    rows = [r for r in ROWS if r.name in names] if names else ROWS
    torchao = any(r.float8 != "none" for r in rows) and importable("torchao", env)  # a second or more to ask
    planned = None if dry else planned_gibs(env)
    for row in rows:
        skip = skip_reason(row, deadline - time.monotonic(), torchao)
        results.add({"row": row.name, "skipped": skip} if skip else
                    measure(row, kit, out, deadline, env, results, planned))
    print(results.table(), flush=True)
    profiles = [out / f"profile_{slug_of(row)}.txt" for row in ROWS]
    first = next((p for p in profiles if p.is_file()), None)
    if first:  # the first row's, the one that decides what to speed up next
        print("\n".join(first.read_text().splitlines()[:40]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="build the kit on the CPU").add_argument("kit", type=Path)
    go = sub.add_parser("run", help="run the rows, writing OUT/results.jsonl and OUT/results.md")
    go.add_argument("kit", type=Path)
    go.add_argument("out", type=Path)
    go.add_argument("--budget-s", type=float, default=450, help="start no row after this many seconds")
    go.add_argument("--dry-run", action="store_true", help="the same steps on the CPU: debug model, no torchtitan")
    go.add_argument("--rows", default="", help="comma-separated row names to run (default: all, in order)")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.kit)
    else:
        run(args.kit, args.out, args.budget_s, args.dry_run, [n for n in args.rows.split(",") if n])


if __name__ == "__main__":
    main()
