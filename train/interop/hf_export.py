"""Export of a DCP checkpoint (any world size) as a Hugging Face transformers Llama folder.

The folder holds `config.json`, `model.safetensors` (or `model-0000i-of-0000n.safetensors` shards
plus `model.safetensors.index.json`), `generation_config.json`, the marker `llm_pretrain_export.json`
(source, tokenizer sha256, file names) and, when a tokenizer is given, the tokenizer files of
train/interop/hf_tokenizer.py (for Meta's tiktoken file, `original/tokenizer.model` among them; the chat template,
where the run has one, in tokenizer_config.json).
It is written beside `out_dir` and renamed into place, so a failed export (a full
disk included) leaves no half folder, and the staging folder of one killed outright is removed by the next export
into the same place. An export never touches its source run, and `overwrite` replaces only a folder that holds a
previous export.
"""

import json
import logging
import os
import re
import shutil
import socket
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from data_pipeline.disk import NO_SPACE, NoSpaceError
from data_pipeline.progress import Meter
from model import ModelConfig
from model.hf import to_hf_config, to_hf_key

from ..state.checkpoint_io import read_train_state
from .hf_import import model_context
from .hf_tokenizer import EXPORT_MARKER, chat_template_for, check_tokenizer, export_tokenizer, writing
from .offline_checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    checkpoint_dtypes,
    checkpoint_model_config,
    expected_shapes,
    is_hf_folder,
    read_checkpoint,
)

log = logging.getLogger("train")

# The names an export holds (transformers' tokenizer files included); a folder with anything else in it
# is not one, and overwrite=true leaves it alone. The marker lists what a newer transformers adds.
EXPORT_FILES = {"config.json", "generation_config.json", SINGLE_FILE, INDEX_FILE, EXPORT_MARKER, "tokenizer.model",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
ORIGINAL_FILES = {"tokenizer.model"}  # what an export's original/ folder holds (a Meta tiktoken tokenizer)
SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# What a run writes in its folder (train/state/checkpoint.py's RUN_RECORDS, its logs, W&B's and Hydra's folders, and the
# replaced-<time>/ folders of checkpoint.overwrite): an export may go in a new folder beside these, never in them.
RUN_OWNED = {"checkpoints", "ledger", "logs", "metrics.jsonl", "tensorboard", "wandb", ".hydra", "config.yaml"}


def export_hf(checkpoint_dir, out_dir, tokenizer_path=None, max_shard_bytes: int = 5 * 2**30,
              dtype: torch.dtype | None = None, overwrite: bool = False, markers: tuple[str, str] = ("", ""),
              template: str = "") -> Path:
    """Write a DCP checkpoint (any world size) as a transformers Llama folder; returns out_dir. `markers`: the
    run's data.bos_token and data.eos_token, where its tokenizer's own configuration needed them; `template`: the
    run's data.template (its chat template file; "" = the tokenizer's own, if it has one).

    Tensors are read one output shard at a time, so memory peaks at about one shard."""
    src, out = Path(checkpoint_dir), Path(out_dir)
    check_out_dir(src, out, overwrite)
    model_cfg = checkpoint_model_config(src)
    dtypes = checkpoint_dtypes(src, model_cfg)  # checks the checkpoint before anything is written
    tok_sha = None if tokenizer_path is None else check_tokenizer(Path(tokenizer_path), src, *markers)
    chat = None if tokenizer_path is None else chat_template_for(Path(tokenizer_path), template, *markers)
    # The context the model is made for, not the length the run trained at: Llama 3.1's 131072, carried from init_from.
    hf_cfg = replace(model_cfg, max_seq_len=model_context(src, model_cfg))
    _remove_stale_staging(out)
    tmp = out.with_name(_staging_name(out, "tmp"))
    shutil.rmtree(tmp, ignore_errors=True)
    _make_folder(tmp, out)
    try:
        bos_id = eos_id = None
        if tokenizer_path is not None:
            bos_id, eos_id = export_tokenizer(Path(tokenizer_path), tmp, hf_cfg, *markers, chat_template=chat)
        out_dtype, n_files, total = _write_weights(src, model_cfg, dtypes, tmp, max_shard_bytes, dtype)
        config = {**to_hf_config(hf_cfg, bos_id, eos_id), "torch_dtype": str(out_dtype).removeprefix("torch.")}
        gen = {"bos_token_id": bos_id, "eos_token_id": eos_id, "max_length": hf_cfg.max_seq_len}
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", gen)
        _write_marker(tmp, src, tok_sha)
        _replace_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = _no_space(e, out)
        if full is None:
            raise
        raise full from None
    log.info("exported %s to %s (%d safetensors file(s), %.1f MB)", src, out, n_files, total / 1e6)
    return out


def _staging_name(out: Path, kind: str) -> str:
    """`.NAME.tmp-HOST-PID` (the export being written) or `.NAME.old-HOST-PID` (the export it replaces, for the
    moment between two renames): hidden beside out, and recognisable as this process's by the next export."""
    return f".{out.name}.{kind}-{socket.gethostname()}-{os.getpid()}"


def _remove_stale_staging(out: Path) -> None:
    """Remove, naming them, the staging folders beside out that an export killed before its cleanup (kill -9, a
    lost node) left, each possibly as big as the export. A folder of a process still running on this host, or of
    another host (a shared file system), may be an export being written now: it is named and left alone."""
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:tmp|old)-(?:(?P<host>.+)-)?(?P<pid>\d+)")
    for entry in sorted(out.parent.iterdir()):
        found = pattern.fullmatch(entry.name)
        if found is None or entry.is_symlink() or not entry.is_dir():
            continue
        host, pid = found.group("host"), int(found.group("pid"))
        if host not in (None, socket.gethostname()):
            log.warning("left %s: the staging folder of an export on host %s; remove it if no export runs there",
                        entry, host)
        elif pid != os.getpid() and _running(pid):  # a container's restart may give us its pid
            log.warning("left %s: the staging folder of process %d, which is running", entry, pid)
        else:
            log.warning("removing %s: the staging folder of an export that did not finish (process %d is gone)",
                        entry, pid)
            try:
                shutil.rmtree(entry)
            except OSError as e:  # another user's, say: the export goes on
                log.warning("could not remove %s (%s); remove it yourself", entry, e)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _make_folder(tmp: Path, out: Path) -> None:
    """The export's temporary folder beside out: a place that cannot hold one fails here, naming out."""
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise _no_space(e, out) or ValueError(
            f"out={out}: cannot make a folder there ({e.strerror}); pass out=<a folder you can write>") from None


def check_out_dir(src: Path, out: Path, overwrite: bool) -> None:
    """Refuse an out folder that is or holds the source run or checkpoint (an export replaces its out folder) or
    lies inside the checkpoint or inside what the run writes (RUN_OWNED: its checkpoints, logs, ...); a new folder
    beside them in the run folder (out=<run>/hf, as torchtitan users keep exports) is fine. An existing folder
    is refused unless it is a previous export, and that one only with overwrite."""
    src, where = src.resolve(), out.resolve()
    # The run holds the checkpoint, so whatever overlaps the checkpoint overlaps the run.
    run, what = (src.parent.parent, "run folder") if src.parent.name == "checkpoints" else (src, "checkpoint")
    if where == run or where in run.parents:
        raise ValueError(f"out={out} {'is' if where == run else 'contains'} the source {what} {run}; an export "
                         f"replaces its out folder: pick a new folder{_beside(run, what)}")
    owner = run / where.relative_to(run).parts[0] if run in where.parents else None
    if owner is not None and (what == "checkpoint" or owner.name in RUN_OWNED or owner.name.startswith("replaced-")):
        whose = f"the source checkpoint {run}" if what == "checkpoint" else f"the run's {owner.name} ({owner})"
        raise ValueError(f"out={out} {'is' if where == owner else 'lies inside'} {whose}; an export replaces its "
                         f"out folder: pick a new folder{_beside(run, what)}")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pick another out dir or pass overwrite=true "
                              f"(which replaces a previous export only)")
    foreign = _not_an_export(out)
    if foreign:
        raise FileExistsError(f"out={out} is not a previous export ({foreign}); overwrite=true replaces only a "
                              f"folder export_hf wrote: pick another out dir or remove it yourself")


def _beside(run: Path, what: str) -> str:
    return f" beside the run's checkpoints (out={run / 'hf'}) or outside it" if what == "run folder" else " outside it"


def _not_an_export(out: Path) -> str | None:
    """Why `out` is not a folder export_hf wrote, or None when it is one."""
    if out.is_symlink() or not out.is_dir():
        return "it is a symbolic link" if out.is_symlink() else "it is a file"
    if not is_hf_folder(out):
        return "no config.json with safetensors"
    try:
        listed = set(json.loads((out / EXPORT_MARKER).read_text()).get("files", []))
    except (OSError, ValueError, AttributeError):  # an export from before the marker, or a damaged one
        listed = set()
    for entry in sorted(out.iterdir()):
        if entry.name == "original" and _holds_only(entry, ORIGINAL_FILES):
            continue
        known = entry.name in EXPORT_FILES | listed or SHARD_FILE.fullmatch(entry.name)
        if not known or entry.is_symlink() or not entry.is_file():
            return f"it holds {entry.name}{'/' if entry.is_dir() else ''}, which an export does not"
    return None


def _holds_only(folder: Path, names: set[str]) -> bool:
    """A real folder (no link) of plain files named in `names`."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    return all(e.name in names and e.is_file() and not e.is_symlink() for e in folder.iterdir())


def _write_marker(tmp: Path, src: Path, tok_sha: str | None) -> None:
    """What makes the folder recognisable as an export, and records the tokenizer for launch/generate.py."""
    state = read_train_state(src)
    files = sorted(p.name for p in tmp.iterdir()) + [EXPORT_MARKER]
    marker = {"written_by": "launch/export_hf.py", "source": str(src.resolve()), "step": state.get("step"),
              "tokenizer_sha256": tok_sha, "files": files}
    _write_json(tmp / EXPORT_MARKER, marker)


def _write_json(path: Path, value) -> None:
    with writing(path):
        path.write_text(json.dumps(value, indent=2))


def _no_space(e: BaseException, out: Path) -> NoSpaceError | None:
    """One line for a write that failed for want of space (a full disk, a quota, a file-size limit), naming the
    folder and the file (train/interop/hf_tokenizer.py's `writing` names it); None for any other failure."""
    if not isinstance(e, OSError) or e.errno not in NO_SPACE:
        return None
    name = Path(e.filename).name if e.filename else "the export"
    kept = f"{out} is unchanged" if out.exists() else "nothing was left behind"
    return NoSpaceError(f"no space left on {out.parent} while writing {name} of the export to {out} "
                        f"({os.strerror(e.errno)}); {kept}: free some space or pick another out dir")


def _write_weights(src: Path, model_cfg: ModelConfig, dtypes: dict[str, torch.dtype], tmp: Path, max_shard_bytes: int,
                   dtype: torch.dtype | None) -> tuple[torch.dtype, int, int]:
    """The safetensors file(s) (and index) in `tmp`, one output shard read at a time; returns
    (dtype of the first tensor written, number of files, bytes written)."""
    shapes = expected_shapes(model_cfg)
    out_dtypes = {n: dtype or d for n, d in dtypes.items()}
    groups = _plan_shards(shapes, out_dtypes, max_shard_bytes)
    weight_map, total = {}, 0
    # a bar on a terminal, else a log line every half minute: a 70B export writes for many minutes
    meter = Meter("exporting", log, sum(shapes[n].numel() * out_dtypes[n].itemsize for n in shapes), "B")
    try:
        for i, names in enumerate(groups):
            fname = SINGLE_FILE if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            part = read_checkpoint(src, names, shapes, dtypes)
            hf = {to_hf_key(n): t.to(out_dtypes[n]).contiguous() for n, t in part.items()}
            with writing(tmp / fname):
                save_file(hf, str(tmp / fname), metadata={"format": "pt"})
            os.chmod(tmp / fname, 0o644)  # safetensors writes 0600; the export is meant to be shared
            written = sum(t.numel() * t.element_size() for t in hf.values())
            weight_map.update(dict.fromkeys(hf, fname))
            total += written
            meter.update(written, f"file {i + 1} of {len(groups)}, {sum(map(len, groups[:i + 1]))} tensors")
            del part, hf
    finally:
        meter.close(complete=len(weight_map) == len(shapes))
    if len(groups) > 1:
        _write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return next(iter(out_dtypes.values())), len(groups), total


def _plan_shards(shapes, dtypes, max_shard_bytes: int) -> list[list[str]]:
    """Consecutive names grouped so that each group stays under max_shard_bytes (a bigger tensor
    gets a group of its own)."""
    groups, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = shape.numel() * dtypes[name].itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an old out dir (an empty one or a previous export, as
    check_out_dir allowed) is removed only after the rename."""
    old = None
    if out.exists():
        old = out.with_name(_staging_name(out, "old"))
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)
