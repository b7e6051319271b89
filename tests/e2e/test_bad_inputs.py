"""A catalogue of bad inputs (config, data, checkpoints, output) through the real entry points.

Each row must exit non-zero with a one-line error naming the key or file (`error (rank N): ...`
from launch/pretrain.py, `error: ...` from the data pipeline), print no Python traceback
(torchrun's own failure summary aside), and leave every earlier checkpoint, shard and tokenizer
byte for byte as it was. Most rows run one process without torchrun (the entry point makes a world
of one) to keep the file fast.
"""

import hashlib
import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, TINY, env, pretrain_cmd, tiny_data, without_torchrun_summary

BASE = [*TINY, "global_batch_size=4", "micro_batch_size=4", "steps=2", "checkpoint.save_final=true"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data) -> Path:
    """A finished 2-step run with one checkpoint (step 2): every row starts from a copy of it."""
    run = tmp_path_factory.mktemp("base") / "run"
    proc = subprocess.run(one_process(run, *BASE, *data), cwd=run.parent, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def one_process(run: Path, *overrides: str, conf: str = "debug") -> list[str]:
    return [sys.executable, str(REPO / "launch" / "pretrain.py"), f"+conf={conf}", f"hydra.run.dir={run}", *overrides]


class Ctx:
    """What a row may use: its own copy of the base run, the shared data, a scratch folder."""

    def __init__(self, tmp: Path, run: Path, data: list[str]):
        self.tmp, self.run, self.data = tmp, run, data
        self.tokenizer = Path(data[1].split("=", 1)[1])
        self.shards = Path(data[2].split("=", 1)[1].strip("[]"))
        self.protect = [run / "checkpoints", self.shards, self.tokenizer]

    def shard_copy(self) -> Path:
        copy = self.tmp / "shards"
        shutil.copytree(self.shards, copy)
        self.protect.append(copy)
        return copy

    def first_train_shard(self, shards: Path) -> Path:
        return sorted((shards / "train").glob("*.bin"))[0]


def damage(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def truncated_shard(c: Ctx) -> list[str]:
    s = c.shard_copy()
    f = c.first_train_shard(s)
    f.write_bytes(f.read_bytes()[:-100])
    return [f"data.shards=[{s}]"]


def corrupted_shard(c: Ctx) -> list[str]:
    s = c.shard_copy()
    damage(c.first_train_shard(s), 200, b"\x05\x00")  # a valid token id: only the checksum can tell
    return [f"data.shards=[{s}]"]


def damaged_val_shard(c: Ctx) -> list[str]:
    s = c.shard_copy()
    damage(sorted((s / "val").glob("*.bin"))[0], 200, b"\x05\x00")  # the split used to be dropped without a word
    return [f"data.shards=[{s}]", "steps=4"]


def manifest_total_raised(c: Ctx) -> list[str]:
    s = c.shard_copy()
    manifest = json.loads((s / "manifest.json").read_text())
    manifest["splits"]["train"]["tokens"] += 1000  # it used to fail at step 1 with an IndexError
    (s / "manifest.json").write_text(json.dumps(manifest))
    return [f"data.shards=[{s}]", "steps=4"]


def other_tokenizer(c: Ctx) -> list[str]:
    from data_pipeline.sample_corpus import sample_corpus_dir
    from data_pipeline.tokenizer import train_tokenizer

    files = [str(p) for p in sorted(sample_corpus_dir().glob("*.txt"))[:2]]
    return [f"data.tokenizer={train_tokenizer(files, c.tmp / 'other.model', vocab_size=400).path}"]


def not_a_tokenizer(c: Ctx) -> list[str]:
    (c.tmp / "notes.model").write_text("not a SentencePiece model\n")
    return [f"data.tokenizer={c.tmp / 'notes.model'}"]


def no_manifest(c: Ctx) -> list[str]:
    (c.tmp / "empty_set").mkdir()
    return [f"data.shards=[{c.tmp / 'empty_set'}]"]


def incomplete_step(c: Ctx) -> list[str]:
    """A step folder without DCP's .metadata (as if copied half-way)."""
    ckpts = c.run / "checkpoints"
    shutil.copytree(ckpts / "step_00000002", ckpts / "step_00000004", ignore=shutil.ignore_patterns(".metadata"))
    return ["checkpoint.resume=4", "steps=6"]


def damaged_checkpoint(c: Ctx) -> list[str]:
    shard = sorted((c.run / "checkpoints" / "step_00000002").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])  # hashed after this: the run must not touch it further
    return ["steps=4"]


def bad_hf_config(c: Ctx) -> list[str]:
    hf = c.tmp / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "llama", "hidden_size": ')  # cut off mid-write
    (hf / "model.safetensors").write_bytes(b"")
    return [f"checkpoint.init_from={hf}", "checkpoint.resume=none", "checkpoint.overwrite=true"]


def init_from_left_to_the_preset(c: Ctx) -> list[str]:
    """Continued pretraining from the base run's checkpoint (dim 64, 2 layers) with the run's shape left to the
    8b preset (its model.* keys left out): the shapes' difference, not a memory estimate of an 8B model."""
    source = c.tmp / "source"
    shutil.copytree(c.run / "checkpoints" / "step_00000002", source)
    return ["model.preset=8b", *(f"model.{key}=null" for key in ("dim", "n_layers", "n_heads", "n_kv_heads")),
            f"checkpoint.init_from={source}", "checkpoint.resume=none", "checkpoint.overwrite=true"]


def logs_is_a_file(c: Ctx) -> list[str]:
    shutil.rmtree(c.run / "logs")
    (c.run / "logs").write_text("not a folder\n")  # the run folder cannot be written as it should
    return ["steps=4"]


def full_disk(c: Ctx) -> list[str]:
    # Resumes from step 2, trains 2 steps, then the save hits the file-size limit; W&B's own log
    # writes fail too and must not print tracebacks.
    return ["steps=4", "wandb.mode=offline"]


def limit_file_size() -> None:
    """preexec_fn: writes past 20 kB fail with EFBIG (the checkpoint's shard is ~130 kB), like a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead of failing the write
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def static(*overrides: str):
    return lambda c: list(overrides)


# (id, overrides or a function of Ctx returning them, text the error line must contain, ranks)
# ranks 1: one process without torchrun; 2: under torchrun on 2 ranks.
TRAIN_ROWS = [
    ("unknown_conf", static(), "conf/nope.yaml", 1),
    ("misspelt_key", static("stepz=3"), "unknown key 'stepz' (did you mean 'steps'?)", 1),
    ("misspelt_nested_key", static("optim.lrr=1"), "unknown key 'optim.lrr' (did you mean 'optim.lr'?)", 1),
    ("wrong_type", static("steps=abc"), "steps=abc", 1),
    ("heads_not_divisible_by_kv_heads", static("model.n_kv_heads=3"), "model.n_kv_heads", 1),
    ("dim_not_divisible_by_heads", static("model.dim=66"), "model.dim", 1),
    ("batch_not_divisible", static("global_batch_size=6", "micro_batch_size=2"), "global_batch_size", 2),
    ("seq_len_above_max", static("data.seq_len=4096"), "data.seq_len", 1),
    ("negative_lr", static("optim.lr=-1"), "optim.lr", 1),
    ("min_lr_above_lr", static("optim.min_lr=1"), "optim.min_lr", 1),
    ("unknown_preset", static("model.preset=llama9"), "llama9", 1),
    ("unknown_ac_mode", static("parallel.activation_checkpointing=sometimes"), "parallel.activation_checkpointing", 1),
    ("ac_every_zero", static("parallel.activation_checkpointing=every_k", "parallel.ac_every=0"), "parallel.ac_every",
     1),
    ("unknown_schedule", static("optim.schedule=step"), "optim.schedule", 1),
    ("unknown_dtype", static("parallel.dtype=fp8"), "parallel.dtype", 1),
    ("unknown_float8_recipe", static("parallel.float8=fp4"), "parallel.float8", 1),
    ("model_larger_than_memory", static("model.dim=8192", "model.n_layers=64", "model.n_heads=64"),
     "GiB per rank but a device has", 1),
    ("dp_replicate_not_dividing_world", static("parallel.dp_replicate=3"), "parallel.dp_replicate", 2),
    ("tp_not_dividing_world", static("parallel.tp=2"), "parallel.tp=2 must divide the world size 1", 1),
    ("kv_heads_not_divisible_by_tp", static("parallel.tp=2", "model.n_kv_heads=1"), "n_kv_heads=1", 2),
    ("async_tp_on_cpu", static("parallel.async_tp=true"), "parallel.async_tp=True needs CUDA GPUs", 1),
    ("pp_not_dividing_world", static("parallel.pp=2"), "parallel.pp=2 x parallel.tp=1 must divide the world size 1",
     1),
    ("unknown_pp_schedule", static("parallel.pp_schedule=DualPipe"), "parallel.pp_schedule='DualPipe'", 1),
    ("zero_steps", static("steps=0"), "steps", 1),
    ("keep_last_zero", static("checkpoint.keep_last=0"), "checkpoint.keep_last", 1),
    ("weights_wrong_count", static("data.weights=[1,2]"), "data.weights", 1),
    ("tokenizer_unset", static("data.tokenizer=''"), "data.tokenizer", 1),
    ("missing_tokenizer_file", lambda c: [f"data.tokenizer={c.tmp / 'nope.model'}"], "nope.model", 1),
    ("not_a_tokenizer", not_a_tokenizer, "notes.model", 1),
    ("missing_data_path", lambda c: [f"data.shards=[{c.tmp / 'nope'}]"], "nope/manifest.json", 1),
    ("manifest_less_folder", no_manifest, "empty_set/manifest.json", 1),
    ("truncated_shard", truncated_shard, "000000.bin", 1),
    ("corrupted_shard", corrupted_shard, "checksum", 1),
    ("tokenizer_mismatch", other_tokenizer, "manifest.json: built with tokenizer", 1),
    ("checkpoint_of_another_shape", static("model.dim=96", "steps=4"), "model.dim was 64 and is now 96", 1),
    ("resume_missing_step", static("checkpoint.resume=99", "steps=4"), "checkpoint.resume=99", 1),
    ("resume_incomplete_step", incomplete_step, "checkpoint.resume=4", 1),
    ("damaged_checkpoint", damaged_checkpoint, "step_00000002", 1),
    # In the base run's folder: a fresh start there needs checkpoint.overwrite=true, which moves nothing when it fails.
    ("init_from_missing", lambda c: [f"checkpoint.init_from={c.tmp / 'nope'}", "checkpoint.resume=none",
                                      "checkpoint.overwrite=true"], "nope", 1),
    ("init_from_corrupt_hf_config", bad_hf_config, "config.json", 1),
    ("init_from_of_another_shape", init_from_left_to_the_preset,
     "model.dim=64 (the run: 4096), model.n_layers=2 (the run: 32), model.n_heads=4 (the run: 32)", 1),
    ("output_folder_unwritable", logs_is_a_file, "logs", 1),
    ("disk_full_during_save", full_disk, "the file-size limit (ulimit -f: 20000 bytes) stopped writing", 1),
    # A validation split too small for one batch fails at start-up, not after training (val: ~500 windows).
    ("val_split_smaller_than_a_batch", static("micro_batch_size=4096", "global_batch_size=4096", "steps=4"),
     "cannot fill one batch of micro_batch_size x data-parallel ranks", 1),
    ("data_changed_on_resume", lambda c: [f"data.shards=[{c.shards},{c.shard_copy()}]", "steps=4"],
     "data.shards changed since the checkpoint", 1),
    ("seed_changed_on_resume", static("seed=1", "steps=4"), "seed was 0 and is now 1", 1),
    ("damaged_validation_shard", damaged_val_shard, "val/000000.bin: checksum differs", 1),
    ("manifest_total_raised", manifest_total_raised, "manifest.json: splits.train.tokens is", 1),
    ("unresolved_interpolation", static("run_name='${nope}'"), "run_name='${nope}': Interpolation key 'nope' not found",
     1),
    ("interpolation_of_wrong_type", static("steps=${run_name}"), "steps=${run_name}", 1),
    ("conf_given_as_a_path", static("+conf=../conf/debug"), "+conf takes the name of a preset", 1),
    ("resume_names_no_form", static("checkpoint.resume=latest", "steps=4"),
     "checkpoint.resume=latest: no checkpoint folder latest; use auto (the latest), none, a step number", 1),
]


def hashes(paths: list[Path]) -> dict[str, str]:
    out = {}
    for root in paths:
        for f in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def check_failed(proc, names: str, ranks: int) -> None:
    err = without_torchrun_summary(proc.stderr)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in err and "Traceback" not in proc.stdout, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith(("error (rank", "error:"))]
    assert len(lines) == ranks, err[-3000:]  # one line per process
    if ranks == 1:  # nothing after it (an abort's message); torchrun's own lines follow its workers'
        assert err.strip().splitlines()[-1] == lines[0], err[-3000:]
    for line in lines:
        assert names in line, err[-3000:]


@pytest.mark.parametrize("name, make, names, ranks", TRAIN_ROWS, ids=[r[0] for r in TRAIN_ROWS])
def test_bad_training_input(name, make, names, ranks, tmp_path, base_run, data):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    c = Ctx(tmp_path, run, data)
    overrides = [*BASE, *data, *make(c)]
    before = hashes(c.protect)
    conf = "nope" if name == "unknown_conf" else "debug"
    cmd = pretrain_cmd(ranks, run, *overrides, conf=conf) if ranks == 2 else one_process(run, *overrides, conf=conf)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=limit_file_size if make is full_disk else None)
    check_failed(proc, names, ranks)
    after = hashes(c.protect)
    assert {f: after.get(f) for f in before} == before  # nothing that existed was changed or removed
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads a process's threads from /proc")
def test_a_start_up_error_ends_the_process_groups_threads_before_exit(tmp_path, data):
    """The one line is the last thing a failed start-up prints: its gloo and TCPStore threads are joined before the
    interpreter's teardown, which, meeting them still running, at times aborted the process after the line
    ("terminate called without an active exception"). Seen from an atexit handler, run after the line."""
    from exit_threads import ENV, HOOK

    threads = tmp_path / "threads.txt"
    run_env = {**env(), ENV: str(threads), "PYTHONPATH": str(REPO / "tests" / "support")}
    cmd = one_process(tmp_path / "run", *BASE, *data, f"data.shards=[{tmp_path / 'nope'}]", f"hooks=[{HOOK}]")
    proc = subprocess.run(cmd, cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=300)
    check_failed(proc, "nope/manifest.json", 1)
    names = threads.read_text().split()
    assert names and not [n for n in names if "gloo" in n or "tcpstore" in n], names


def data_pipeline(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_pipeline", *map(str, args)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)


def test_bad_data_pipeline_inputs(tmp_path, data):
    """Rows of the data pipeline's command line (grouped: each starts in a few seconds)."""
    import json

    from data_pipeline.sample_corpus import sample_corpus_dir

    c = Ctx(tmp_path, tmp_path / "no_run", data)
    damaged = c.shard_copy()
    damage(c.first_train_shard(damaged), 200, b"\x05\x00")
    play = sorted(sample_corpus_dir().glob("*.txt"))[5]
    work = tmp_path / "W"  # a folder holding a build's inputs and tokenizer
    (work / "raw").mkdir(parents=True)
    shutil.copy(play, work / "raw")
    shutil.copy(c.tokenizer, work / "tok.model")
    latin1 = tmp_path / "latin1.txt"  # valid UTF-8, then a Latin-1 byte
    prefix = play.read_text(encoding="utf-8")[:1000].encode()
    latin1.write_bytes(prefix + "café\n".encode("latin-1"))  # the bad byte: é, after prefix + "caf"
    c.protect += [work, latin1]
    before = hashes(c.protect)

    check_failed(data_pipeline("build", f"inputs=[{tmp_path / 'nope.txt'}]", f"out_dir={tmp_path / 'out'}",
                               f"tokenizer={c.tokenizer}"), "nope.txt", 1)
    assert not (tmp_path / "out").exists()
    check_failed(data_pipeline("verify", f"out_dir={damaged}", f"tokenizer={c.tokenizer}"), "000000.bin", 1)
    # A different build into an existing shard set must not replace it without overwrite=true.
    check_failed(data_pipeline("build", f"inputs=[{play}]", f"out_dir={c.shards}", f"tokenizer={c.tokenizer}"),
                 str(c.shards), 1)
    check_failed(data_pipeline("train-tokenizer", f"inputs=[{play}]", "vocab_sise=300"), "vocab_sise", 1)
    # overwrite=true never replaces a folder holding the build's own inputs or tokenizer (it deleted them)
    check_failed(data_pipeline("build", f"inputs=[{work / 'raw'}]", f"out_dir={work}",
                               f"tokenizer={work / 'tok.model'}", "overwrite=true"),
                 f"out_dir={work} contains the build's input", 1)
    # nor does train-tokenizer replace an existing model without overwrite=true
    check_failed(data_pipeline("train-tokenizer", f"inputs=[{play}]", f"model_path={c.tokenizer}", "vocab_size=400"),
                 f"model_path={c.tokenizer} already exists", 1)
    # a .txt input that is not UTF-8: the file and the byte, not a DatasetGenerationError
    check_failed(data_pipeline("build", f"inputs=[{latin1}]", f"out_dir={tmp_path / 'out'}",
                               f"tokenizer={c.tokenizer}"), f"{latin1}: not UTF-8 text (byte {len(prefix) + 3}:", 1)
    # A full disk while writing shards: one line naming the folder and file, and nothing that looks complete.
    # The inputs are the data fixture's, already in the datasets cache, so only the shards are written.
    inputs = ",".join(s["path"] for s in json.loads((c.shards / "manifest.json").read_text())["sources"])
    full = subprocess.run([sys.executable, "-m", "data_pipeline", "build", f"inputs=[{inputs}]",
                           f"out_dir={tmp_path / 'full'}", f"tokenizer={c.tokenizer}", "num_proc=1"], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    part = tmp_path / ".full.partial" / "parts" / "00000-of-00001.tmp" / "train"  # the part being written
    check_failed(full, f"no space left on {part} while writing ", 1)
    assert not (tmp_path / "full").exists() and not list(tmp_path.glob(".full.partial/**/part.json"))
    assert hashes(c.protect) == before
