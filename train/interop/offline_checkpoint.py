"""Finding a checkpoint (run dir, DCP step folder, Hugging Face folder or Meta's original folder) and reading a DCP
checkpoint's model weights in one process, without a process group, whatever world size wrote it.

Used by the HF export, `init_from` and launch/generate.py; the trainer's own resume is train/state/checkpoint.py.
"""

import warnings
from dataclasses import fields
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from model import Llama, ModelConfig
from model.meta import is_meta_folder

from ..state.checkpoint_io import STATE_FILE, Checkpointer, is_complete, read_train_state

# The weight files of a Hugging Face folder: one file, or shards listed by an index.
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def find_checkpoint(path) -> Path:
    """A run dir -> its newest complete checkpoint; a checkpoint, HF or Meta folder -> itself."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory; pass a run dir, a checkpoint or an HF folder")
    if is_complete(path) or is_hf_folder(path) or is_meta_folder(path):
        return path
    if (path / "checkpoints").is_dir():
        latest = Checkpointer(path / "checkpoints").latest()
        if latest is None:
            raise FileNotFoundError(f"{path}/checkpoints holds no complete checkpoint; train with "
                                    f"checkpoint.save_final=true or pass a step_* folder")
        return latest
    raise FileNotFoundError(f"{path}: not a complete checkpoint (needs .metadata and {STATE_FILE}), "
                            f"a run dir (with checkpoints/), an HF folder (config.json + *.safetensors) or Meta's "
                            f"original folder (params.json + consolidated.00.pth)")


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and ((path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file())


def checkpoint_model_config(path: Path) -> ModelConfig:
    """The ModelConfig a DCP checkpoint was trained with (train_state.json's fingerprint)."""
    if not is_complete(path):
        raise FileNotFoundError(f"{path}: not a complete checkpoint (needs .metadata and {STATE_FILE}); "
                                f"point at a step_* folder of a finished save")
    saved = read_train_state(path).get("fingerprint", {}).get("model")
    if not isinstance(saved, dict):
        raise ValueError(f"{path / STATE_FILE} has no fingerprint.model; it was not written by the trainer")
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in saved.items() if k in known})


def expected_shapes(model_cfg: ModelConfig) -> dict[str, torch.Size]:
    """Our parameter names and shapes, in module order (built on meta: no memory)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in Llama(model_cfg).state_dict().items()}


def checkpoint_dtypes(path: Path, model_cfg: ModelConfig) -> dict[str, torch.dtype]:
    """Name -> stored dtype of every model weight, after checking the shapes against the config."""
    stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    dtypes = {}
    for name, shape in expected_shapes(model_cfg).items():
        meta = stored.get(f"model.{name}")
        if meta is None or not hasattr(meta, "size"):
            raise ValueError(f"{path}/.metadata has no tensor model.{name}; the checkpoint does not match its "
                             f"{STATE_FILE} (re-save it)")
        if tuple(meta.size) != tuple(shape):
            raise ValueError(f"{path}: model.{name} has shape {tuple(meta.size)} but {STATE_FILE}'s model "
                             f"config gives {tuple(shape)}; the checkpoint is inconsistent (re-save it)")
        dtypes[name] = meta.properties.dtype
    return dtypes


def read_checkpoint(path: Path, names: list[str], shapes, dtypes) -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors of `names` from a checkpoint of any world size, in this process only."""
    tensors = {n: torch.empty(shapes[n], dtype=dtypes[n]) for n in names}
    # DCP reassembles each tensor from however many ranks wrote it; only these keys are read.
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.load({"model": tensors}, checkpoint_id=str(path), no_dist=True)
    return tensors


def load_checkpoint_weights(path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, full model state dict in our names) of a DCP checkpoint, without a process group."""
    path = Path(path)
    model_cfg = checkpoint_model_config(path)
    dtypes = checkpoint_dtypes(path, model_cfg)
    return model_cfg, read_checkpoint(path, list(dtypes), expected_shapes(model_cfg), dtypes)
