"""Shared by the tests and tests/support/fault_inject.py: tiny real data, run the real entry point under torchrun, read
what it wrote, find its worker processes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUPPORT = REPO / "tests" / "support"  # helpers and the scripts tests run under torchrun

# A small model so each run takes seconds on 2 cores; the data is real text.
TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "data.seq_len=64",
        "steps=6", "log_interval=1", "val_batches=2", "optim.warmup_steps=2", "optim.lr=3e-3",
        "checkpoint.save_final=false", "wandb.mode=disabled", "sample_prompt=''",
        "report=false"]  # a second or two per run (matplotlib), drawn only where a test looks at it


def tiny_data(tmp_path_factory) -> list[str]:
    """tiny_data_in() under the session's base temp folder: built once per test session."""
    return tiny_data_in(tmp_path_factory.getbasetemp() / "tiny_data")


def tiny_data_in(root: Path) -> list[str]:
    """Overrides naming a 512-piece SentencePiece tokenizer and a shard set of four real plays, built
    in root (reused when already there)."""
    from data_pipeline.build import build_shards
    from data_pipeline.sample_corpus import sample_corpus_dir
    from data_pipeline.tokenizer import Tokenizer, train_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    files = [str(p) for p in sorted(sample_corpus_dir().glob("*.txt"))[:4]]
    model = root / "tok.model"
    tok = Tokenizer(model) if model.is_file() else train_tokenizer(files, model, vocab_size=512)
    shards = build_shards(files, root / "shards", tok, val_fraction=0.25, num_proc=1, progress=False).parent
    return ["data.demo=false", f"data.tokenizer={tok.path}", f"data.shards=[{shards}]"]


def tiny_paragraphs(tmp_path_factory) -> list[str]:
    """tiny_data()'s tokenizer and plays, the plays cut into paragraphs: many documents per window, for runs with
    data.document_masking (the plays whole put a document boundary in few windows). Built once per session."""
    from data_pipeline.build import build_shards
    from data_pipeline.sample_corpus import sample_corpus_dir
    from data_pipeline.tokenizer import Tokenizer

    tokenizer = next(o for o in tiny_data(tmp_path_factory) if o.startswith("data.tokenizer="))
    files = [str(p) for p in sorted(sample_corpus_dir().glob("*.txt"))[:4]]
    out = tmp_path_factory.getbasetemp() / "tiny_paragraphs"
    shards = build_shards(files, out, Tokenizer(tokenizer.split("=", 1)[1]), txt_mode="paragraph", val_fraction=0.25,
                          num_proc=1, progress=False).parent
    return ["data.demo=false", tokenizer, f"data.shards=[{shards}]"]


# torchrun (`python -m torch.distributed.run`, run as it is) with gc.freeze() as the last thing it does: its
# interpreter then exits without garbage-collecting the ~300k objects torch holds, 0.7 s sooner. The suite
# starts torchrun about a hundred times.
TORCHRUN = [sys.executable, "-c", "import atexit, gc, runpy; atexit.register(gc.freeze); "
            "runpy.run_module('torch.distributed.run', run_name='__main__', alter_sys=True)"]


def pretrain_cmd(nproc: int, run_dir: Path, *overrides: str, conf: str = "debug") -> list[str]:
    return [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}",
            str(REPO / "launch" / "pretrain.py"), f"+conf={conf}", f"hydra.run.dir={run_dir}", *overrides]


def one_process_cmd(run_dir: Path, *overrides: str, conf: str = "debug") -> list[str]:
    """`python launch/pretrain.py`: a world of one without torchrun."""
    return [sys.executable, str(REPO / "launch" / "pretrain.py"), f"+conf={conf}", f"hydra.run.dir={run_dir}",
            *overrides]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drill_injection(drills: dict | None, run_env: dict) -> tuple[list[str], dict]:
    """The overrides and environment that inject tests/support/fault_drills.py's drills (e.g. {"nan_loss_steps": [3]})
    into a run as a loop hook: hooks=[fault_drills:FaultDrills], tests/ on PYTHONPATH, the drills in FAULT_DRILLS."""
    if not drills:
        return [], run_env
    from fault_drills import ENV, HOOK

    path = os.pathsep.join(p for p in (str(REPO / "tests" / "support"), run_env.get("PYTHONPATH")) if p)
    return [f"hooks=[{HOOK}]"], {**run_env, "PYTHONPATH": path, ENV: json.dumps(drills)}


def pretrain(nproc: int, run_dir: Path, *overrides: str, conf: str = "debug", check: bool = True,
             torchrun: bool = True, timeout: int = 600, drills: dict | None = None):
    """Run launch/pretrain.py under torchrun; returns the finished process. torchrun=False (nproc 1) runs it as
    one plain process instead, 3 s sooner (no torchrun agent to start), for tests of what a run does rather
    than of how it was launched; its rendezvous port is a free one, as torchrun --standalone picks. drills:
    deliberate faults (tests/support/fault_drills.py), e.g. {"spike_data_steps": [10], "stop_at_step": 12}."""
    injected, run_env = drill_injection(drills, env())
    if torchrun:
        cmd = pretrain_cmd(nproc, run_dir, *overrides, *injected, conf=conf)
    else:
        assert nproc == 1, "only one process runs without torchrun"
        cmd = one_process_cmd(run_dir, *overrides, *injected, conf=conf)
        run_env = {**run_env, "MASTER_PORT": str(free_port())}
    proc = subprocess.run(cmd, cwd=run_dir.parent, env=run_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"pretrain failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def without_torchrun_summary(stderr: str) -> str:
    """stderr without torchrun's own failure summary (a traceback that ends in ChildFailedError)."""
    end = stderr.find("torch.distributed.elastic.multiprocessing.errors.ChildFailedError")
    return stderr if end < 0 else stderr[: stderr.rfind("Traceback (most recent call last)", 0, end)]


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss by step; a step logged twice (re-done after a resume) keeps its last value."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def ledger_by_rank(run_dir: Path) -> dict[int, dict[str, list[int]]]:
    """Global samples each rank's ledger file (by file name) says each step consumed; the last write of a
    step counts (a step re-done after a resume)."""
    by_step: dict[int, dict[str, list[int]]] = {}
    for f in sorted((run_dir / "ledger").glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            by_step.setdefault(row["step"], {})[f.name] = row["samples"]
    return dict(sorted(by_step.items()))


def ledger(run_dir: Path) -> dict[int, list[int]]:
    """Global samples consumed by each step, over all ranks (the last write of a step counts)."""
    return {step: sorted(s for rank in ranks.values() for s in rank) for step, ranks in ledger_by_rank(run_dir).items()}


def children(pid: int) -> list[int]:
    """Direct child processes of pid (torchrun's workers), from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def workers(torchrun_pid: int) -> dict[int, int]:
    """torchrun's worker processes, pid by rank (the RANK in each child's environment), from /proc."""
    out = {}
    for pid in children(torchrun_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # it ended meanwhile
            continue
        rank = next((int(v[5:]) for v in environ if v.startswith(b"RANK=")), None)
        if rank is not None:
            out[rank] = pid
    return out


def wandb_history(run: Path) -> list[dict]:
    """Every history row of every offline folder of the run, in the order `wandb sync
    <run>/wandb/offline-run-*` uploads them (the folder names start with the start time)."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted((run / "wandb").glob("offline-run-*/run-*.wandb")):
        for raw in wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def wandb_records(path: Path):
    """Records of a .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB-log
    framing in 32 KiB blocks (crc32 4 bytes, length 2, type 1: full, first, middle, last)."""
    data, block, pos, parts = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: skip to the next block
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        parts = payload if kind in (1, 2) else parts + payload
        if kind in (1, 4):
            yield parts


def sample_of(run: Path) -> str:
    """The end-of-run sample rank 0 logged (sample_prompt)."""
    lines = [line for line in (run / "logs" / "rank0.log").read_text().splitlines() if "sample: " in line]
    assert len(lines) == 1, f"{run}: {len(lines)} sample lines"
    return lines[0].split("sample: ", 1)[1]


def assert_same_shard_set(built: Path, expected: Path) -> None:
    """Every shard byte for byte, and the manifest equal but for its time fields (test_data_parts.py and
    tests/e2e/test_slurm_build.py: a build in parts against one on one machine)."""
    def files(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    assert files(built) == files(expected)
    for name in files(expected):
        if name != "manifest.json":
            assert (built / name).read_bytes() == (expected / name).read_bytes(), f"{built / name} differs"
    manifests = [json.loads((root / "manifest.json").read_text()) for root in (built, expected)]
    for m in manifests:
        del m["created_unix"], m["build_seconds"]
    assert manifests[0] == manifests[1]
