"""Meta's original Llama checkpoint format: `params.json` plus `consolidated.NN.pth`, one file per
model-parallel rank (one for 8B, eight for 70B), as Meta's llama-models reference code writes and reads it.

It differs from ours (model/llama.py) in three ways:
- names: the same as ours (our Llama keeps Meta's module names), less the rotary cache `rope.freqs` that
  Llama 2 files carry;
- rotary layout: Meta rotates interleaved pairs (2i, 2i+1) of each head (a complex multiplication), we
  rotate (i, i + Hd/2) as Hugging Face does; the rows of wq and wk are permuted within each head (the
  permutation of transformers' convert_llama_weights_to_hf.py), which leaves q.k, hence attention, unchanged;
- model parallelism: each file holds a slice of every matrix. ColumnParallelLinear weights (wq, wk, wv, w1,
  w3, output) are split by rows (dim 0), RowParallelLinear weights (wo, w2) by columns (dim 1); the
  embedding is a VocabParallelEmbedding in Llama 3 (rows) and a ParallelEmbedding in Llama 2 (columns), so
  its split is read from the shapes. Norms are whole in every file. Where the files outnumber the KV heads
  (Llama 3.1 405B in 16 files, 8 KV heads), consecutive files hold copies of the same KV head (llama-models'
  reshard_mp repeats wk and wv): one copy of each is kept, the others checked to be equal.

Files are memory-mapped (torch.load mmap=True): reading the headers and one tensor touches only those bytes.
"""

import json
import re
from pathlib import Path

import torch

from .config import ModelConfig, RopeScaling
from .llama import Llama

PARAMS_FILE = "params.json"
FIRST_FILE = "consolidated.00.pth"
_FILE_NAME = re.compile(r"consolidated\.(\d+)\.pth")
_COLUMN_PARALLEL = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
                    "feed_forward.w3.weight", "output.weight")
_ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")
_DERIVED = ("rope.freqs",)  # Llama 2's rotary table: rebuilt from the config, never loaded
# Llama 3.1 frequency scaling (llama-models' apply_scaling); Llama 3.2 1B/3B, the tied ones, use factor 32:
# their config.json says so and Meta confirmed it (meta-llama/llama-models issues #166, #241), while params.json
# only says use_scaled_rope.
_SCALED_FACTOR = {False: 8.0, True: 32.0}


class BadMetaFolder(ValueError):
    """A Meta folder whose files do not make one checkpoint (one line naming the file and the field)."""


def is_meta_folder(path: Path) -> bool:
    return (path / PARAMS_FILE).is_file() and (path / FIRST_FILE).is_file()


def meta_to_ours(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """wq or wk rows from Meta's interleaved rotary pairs to our (i, i + Hd/2) pairs, head by head."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


class MetaFolder:
    """The tensors of a Meta folder, memory-mapped, with the ModelConfig its params.json gives, checked
    against the tensors' shapes."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.files = consolidated_files(self.folder)
        self.parts = [_open(f) for f in self.files]
        params = read_params(self.folder)
        self.cfg = config_from_params(params, self._tied(), self.folder / PARAMS_FILE)
        self.kv_copies = self._kv_copies()
        if self.kv_copies > 1:  # the first block's copies checked now, each block's as it is read
            self._holders("layers.0.attention.wk.weight")
            self._holders("layers.0.attention.wv.weight")
        self.shapes = self._merged_shapes()
        check_params(self.cfg, params, self.shapes, self.folder / PARAMS_FILE)

    def tensor(self, name: str) -> torch.Tensor:
        """One full tensor in our layout (model-parallel slices joined, q/k rows permuted)."""
        dim = self._split_dim(name)
        full = self.parts[0][name] if dim is None else torch.cat([p[name] for p in self._holders(name)], dim=dim)
        if name.endswith("attention.wq.weight"):
            return meta_to_ours(full, self.cfg.n_heads)
        if name.endswith("attention.wk.weight"):
            return meta_to_ours(full, self.cfg.kv_heads)
        return full

    def names_by_layer(self) -> list[list[str]]:
        """Our parameter names in groups of one block each, then the rest (what is read at once)."""
        names = list(self.shapes)
        layers = [[n for n in names if n.startswith(f"layers.{i}.")] for i in range(self.cfg.n_layers)]
        return layers + [[n for n in names if not n.startswith("layers.")]]

    def _kv_copies(self) -> int:
        """How many consecutive files hold the same KV heads: files / n_kv_heads where each file holds one head
        and the files outnumber the heads (each file needs whole KV heads for its query heads), else 1."""
        wk = self.parts[0].get("layers.0.attention.wk.weight")
        n, heads = len(self.parts), self.cfg.kv_heads
        if wk is None or n <= heads or wk.shape[0] != self.cfg.head_dim:
            return 1
        if n % heads:
            raise BadMetaFolder(f"{self.folder}: {n} model-parallel files cannot share n_kv_heads={heads} KV heads "
                                f"({self.folder / PARAMS_FILE}); the files and params.json are not one checkpoint")
        return n // heads

    def _holders(self, name: str) -> list[dict[str, torch.Tensor]]:
        """The parts whose slices of `name` join into the whole tensor: for a KV weight repeated across files,
        the first file of each group, the group's other files checked to hold the same copy."""
        if self.kv_copies == 1 or not name.endswith(("attention.wk.weight", "attention.wv.weight")):
            return self.parts
        for i, part in enumerate(self.parts):
            first = i - i % self.kv_copies
            if not torch.equal(part[name], self.parts[first][name]):
                raise BadMetaFolder(
                    f"{self.files[i]}: {name} differs from {self.files[first].name}'s, but {len(self.parts)} files of "
                    f"a model with n_kv_heads={self.cfg.kv_heads} ({PARAMS_FILE}) hold each KV head in "
                    f"{self.kv_copies} files alike; the files are not one checkpoint, or params.json is not theirs")
        return self.parts[::self.kv_copies]

    def _split_dim(self, name: str) -> int | None:
        """The dimension along which the model-parallel files split `name` (None: whole in each file)."""
        if len(self.parts) == 1:
            return None
        if name.endswith(_COLUMN_PARALLEL):
            return 0
        if name.endswith(_ROW_PARALLEL):
            return 1
        if name == "tok_embeddings.weight":  # rows in Llama 3, columns in Llama 2: whichever is not the width
            return 0 if self.parts[0][name].shape[1] == self.parts[0]["norm.weight"].shape[0] else 1
        return None

    def _merged_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for name, first in self.parts[0].items():
            if name in _DERIVED or (self.cfg.tie_embeddings and name == "output.weight"):
                continue
            for f, part in zip(self.files, self.parts):
                if name not in part:
                    raise BadMetaFolder(f"{f} has no tensor {name} (which {self.files[0].name} has); the files are "
                                        f"not one checkpoint: download them again")
            shape, dim = list(first.shape), self._split_dim(name)
            if dim is not None:
                copies = self.kv_copies if name.endswith(("attention.wk.weight", "attention.wv.weight")) else 1
                shape[dim] = sum(p[name].shape[dim] for p in self.parts) // copies
            shapes[name] = tuple(shape)
        return shapes

    def _tied(self) -> bool:
        """No output matrix, or one equal to the embedding (Llama 3.2 1B/3B store the shared matrix twice)."""
        first = self.parts[0]
        if "output.weight" not in first:
            return True
        out, emb = first["output.weight"], first.get("tok_embeddings.weight")
        if emb is None or out.shape != emb.shape:
            return False
        rows = slice(None, None, max(1, out.shape[0] // 64))  # a sample of rows decides: untied ones differ
        return all(torch.equal(p["output.weight"][rows], p["tok_embeddings.weight"][rows]) for p in self.parts)


def consolidated_files(folder: Path) -> list[Path]:
    """consolidated.00.pth .. consolidated.NN.pth, checked to be numbered without a gap."""
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _FILE_NAME.fullmatch(p.name)))
    for i, (number, path) in enumerate(found):
        if number != i:
            raise BadMetaFolder(f"{folder}: consolidated.{i:02d}.pth is missing (but {path.name} is there); a "
                                f"model-parallel file is missing: download the folder again")
    if not found:
        raise FileNotFoundError(f"{folder}/{FIRST_FILE} not found; pass a folder of Meta's original checkpoint")
    return [p for _, p in found]


def _open(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # zip, pickle and mmap errors come in several types
        raise BadMetaFolder(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]}); download it again") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadMetaFolder(f"{path}: not a state dict of tensors; not one of Meta's consolidated.NN.pth files")
    return state


def read_params(folder: Path) -> dict:
    path = folder / PARAMS_FILE
    try:
        params = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadMetaFolder(f"{path}: not readable as JSON ({e}); download it again") from None
    params = params.get("model", params) if isinstance(params, dict) else params  # some releases nest it
    if not isinstance(params, dict):
        raise BadMetaFolder(f"{path}: not a JSON object of model parameters; download it again")
    return params


def config_from_params(params: dict, tied: bool, path: Path) -> ModelConfig:
    """ModelConfig of a params.json (Meta's ModelArgs); the vocabulary size -1 (Llama 2) is read later from
    the tensors, so it is left at 1 here and checked against them by check_params."""
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    if missing:
        raise BadMetaFolder(f"{path} has no {missing[0]}; it is not the params.json of a Llama checkpoint")
    scaling = None
    if params.get("use_scaled_rope"):
        scaling = RopeScaling(factor=float(params.get("rope_scaling_factor") or _SCALED_FACTOR[tied]))
    try:
        return ModelConfig(dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
                           n_kv_heads=params.get("n_kv_heads"), vocab_size=max(int(params.get("vocab_size", -1)), 1),
                           multiple_of=params.get("multiple_of", 256),
                           ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
                           norm_eps=params.get("norm_eps", 1e-5), rope_theta=float(params.get("rope_theta", 10000.0)),
                           rope_scaling=scaling, max_seq_len=131072 if scaling else 8192, tie_embeddings=tied)
    except (ValueError, TypeError) as e:
        raise BadMetaFolder(f"{path}: {e}") from None


def check_params(cfg: ModelConfig, params: dict, shapes: dict, path: Path) -> None:
    """BadMetaFolder naming the params.json field that disagrees with the tensors' shapes. (Only n_heads
    with n_kv_heads scaled alike leave the shapes as they were, and cannot be caught here.)"""
    if params.get("vocab_size", -1) == -1 and "tok_embeddings.weight" in shapes:  # Llama 2: from the tensors
        cfg.vocab_size = shapes["tok_embeddings.weight"][0]
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in Llama(cfg).state_dict().items()}
    layers = {int(n.split(".")[1]) for n in shapes if n.startswith("layers.")}
    if layers != set(range(cfg.n_layers)):
        raise BadMetaFolder(f"{path}: n_layers={cfg.n_layers} disagrees with the consolidated tensors, which hold "
                            f"{len(layers)} layers; use the params.json that came with these weights")
    for name, need in want.items():
        have = shapes.get(name)
        if have != need:
            field = _blamed_field(name, have, need)
            raise BadMetaFolder(f"{path}: {field}={params.get(field)} disagrees with the consolidated tensors "
                                f"({name} has shape {have}, params.json implies {need}); use the params.json that "
                                f"came with these weights")
    extra = sorted(set(shapes) - set(want))
    if extra:
        raise BadMetaFolder(f"{path.parent}: unexpected tensor {extra[0]}; not a Llama checkpoint this model can load")


def _blamed_field(name: str, have, need) -> str:
    """The params.json field a wrong shape of `name` points at (the embedding comes first, so a wrong dim is
    named there)."""
    if have is None:
        return "n_layers" if name.startswith("layers.") else "vocab_size"
    if name in ("tok_embeddings.weight", "output.weight"):
        return "dim" if have[1] != need[1] else "vocab_size"
    if ".feed_forward." in name:
        return "ffn_dim_multiplier"
    return "n_kv_heads" if name.endswith(("attention.wk.weight", "attention.wv.weight")) else "dim"
