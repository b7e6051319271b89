"""What the trainer needs from the data pipeline: tokenizer, the training stream, validation batches."""

import difflib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.loader import ShardSet, TokenLoader, validation_batches
from data_pipeline.manifest import SplitAbsent
from data_pipeline.packing import ChatShardSet
from data_pipeline.shard_format import HEADER_BYTES
from data_pipeline.tokenizer import Tokenizer, as_setting

from ..config import DataSection
from ..parallel.distributed import Dist, on_every_rank

log = logging.getLogger("train")


@dataclass
class DataBundle:
    tokenizer: Tokenizer
    train: TokenLoader
    val_sets: dict[str, ShardSet]  # name -> the split validated under that name
    seq_len: int
    dp_rank: int
    dp_size: int
    unigram_baseline: float | None = None
    positions: bool = False  # batches carry position_ids (document positions or masking)
    mask_boundary_loss: bool = False  # labels that are a BOS are ignored
    overlong: str = "drop"  # chat sets: what a conversation longer than a window becomes

    def validation(self, name: str, micro_batch_size: int, max_batches: int):
        """This rank's batches (micro_batch_size rows each) of validation set `name`, in order."""
        return validation_batches(self.val_sets[name], self.seq_len, micro_batch_size * self.dp_size, self.dp_rank,
                                  self.dp_size, max_batches=max_batches, return_positions=self.positions,
                                  mask_boundary_loss=self.mask_boundary_loss, overlong=self.overlong)

    def steps_for(self, epochs: float, global_batch_size: int) -> int:
        """Optimizer steps of `epochs` passes over the training windows (rounded down: no window of an epoch is
        seen twice before every other one has been)."""
        windows = sum(self.train.n_windows)
        steps = int(epochs * windows // global_batch_size)
        if steps < 1:
            raise ValueError(f"epochs={epochs}: {epochs} x {windows:,} training windows is less than one step of "
                             f"global_batch_size={global_batch_size}; raise epochs or lower global_batch_size")
        log.info("epochs=%g: %d steps of %d windows (%s windows an epoch)", epochs, steps, global_batch_size,
                 f"{windows:,}")
        return steps


def _split_tokens(shard_dir: Path, split: str):
    """Yield the token arrays of one split, memory-mapped."""
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    dtype = np.dtype(manifest["dtype"])
    for shard in manifest["splits"][split]["shards"]:
        yield np.memmap(shard_dir / shard["file"], dtype=dtype, mode="r", offset=HEADER_BYTES)


def unigram_cross_entropy(shard_dir: Path, vocab_size: int) -> float:
    """Nats per token of the validation tokens under the training split's unigram distribution
    (add-one smoothed): the loss a model that ignores context would reach."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for tokens in _split_tokens(shard_dir, "train"):
        counts += np.bincount(tokens, minlength=vocab_size)[:vocab_size]
    logp = np.log(counts / counts.sum())
    total, n = 0.0, 0
    for tokens in _split_tokens(shard_dir, "val"):
        val_counts = np.bincount(tokens, minlength=vocab_size)[:vocab_size]
        total -= float((val_counts * logp).sum())
        n += int(tokens.size)
    return total / n if n else math.nan


def _open_val(shard_dir: str, opened: dict) -> ShardSet | None:
    """A set's validation split; None for a set built without one (validation.py warns once). A split
    that is there but damaged fails here like a damaged training shard."""
    try:
        return ShardSet.open(shard_dir, split="val", **opened)
    except SplitAbsent:
        return None


def open_val_sets(named: dict[str, str], shard_dirs: list[str], opened: dict) -> dict[str, ShardSet]:
    """data.val_sets opened (a missing folder or split fails naming its key), or the first training set's
    val split as "val" (none: validation.py warns once)."""
    if not named:
        first = next((v for v in (_open_val(d, opened) for d in shard_dirs) if v is not None), None)
        return {"val": first} if first else {}
    sets = {}
    for name, where in named.items():
        folder, _, split = str(where).rpartition(":") if ":" in str(where) else (where, "", "val")
        try:
            sets[name] = ShardSet.open(folder, split=split, **opened)
        except SplitAbsent:
            raise ValueError(f"data.val_sets.{name}={where}: {_other_split(name, folder, split)}") from None
        except (ValueError, OSError) as e:  # the shard set's own one-line error, under the key that named it
            raise ValueError(f"data.val_sets.{name}={where}: {e}") from None
    return sets


def _other_split(name: str, folder: str, split: str) -> str:
    """What to write instead of a split the set does not have, in the key's own folder:split syntax."""
    splits = json.loads((Path(folder) / "manifest.json").read_text())["splits"]
    have = [s for s, info in splits.items() if isinstance(info, dict) and info.get("tokens")]
    close = difflib.get_close_matches(split, have, n=1) or have[-1:]
    advice = f"; write +data.val_sets.{name}={folder}:{close[0]}" if close else ""
    return f"{folder} has no {split!r} split with tokens (it has: {', '.join(have) or 'none'}){advice}"


def check_format(data_cfg: DataSection, sets: list[ShardSet]):
    """A text run trains on text sets, a chat run on chat sets (built with format=chat): one line otherwise."""
    for s in sets:
        chat = isinstance(s, ChatShardSet)
        if chat and data_cfg.format != "chat":
            raise ValueError(f"{s.root} holds conversations (built with format=chat): pass data.format=chat "
                             f"data.document_masking=true to fine-tune on them, or build text shards")
        if not chat and data_cfg.format == "chat":
            raise ValueError(f"{s.root} holds text, not conversations: data.format=chat trains on shard sets built "
                             f"with python -m data_pipeline build ... format=chat")


def log_packing(loader: TokenLoader, overlong: str):
    """How each chat set packs: conversations, windows, padding, and those too long, loudly when most are."""
    for source, packing in zip(loader.sources, loader.packings):
        if packing is None:
            continue
        stats = packing.stats
        log.info(stats.describe(source.name, loader.seq_len, overlong))
        if 2 * stats.dropped > stats.conversations:
            log.warning(f"warning: most conversations of {source.name} ({stats.dropped:,} of "
                        f"{stats.conversations:,}) are longer than data.seq_len + 1 = {loader.seq_len + 1} tokens "
                        f"and are dropped; raise data.seq_len or pass data.overlong=truncate")


def check_markers(tokenizer: Tokenizer, sets: list[ShardSet]):
    """The shards' BOS/EOS ids are the tokenizer's (a build given other bos_token/eos_token has the same sha256)."""
    for s in sets:
        for key, built, ours in (("bos", s.bos_id, tokenizer.bos_id), ("eos", s.eos_id, tokenizer.eos_id)):
            if built != ours:
                name, setting = tokenizer.id_to_token(built), f"data.{key}_token"
                raise ValueError(f"{s.root} was built with {key}_id {built} ({name}) but the tokenizer gives "
                                 f"{ours} ({tokenizer.id_to_token(ours)}); pass {as_setting(setting, name)} "
                                 f"or rebuild the shards")


def open_data(data_cfg: DataSection, env: Dist, global_batch_size: int, seed: int) -> DataBundle:
    """Open (and for the demo, first build) the tokenizer and shard sets named by the config's data section
    (for the demo, its tokenizer and shards are set to what was built)."""
    tokenizer_path, shard_dirs = data_cfg.tokenizer, list(data_cfg.shards)
    if data_cfg.demo:
        from data_pipeline.prepare import ensure_demo_chat_data, ensure_demo_data

        # Rank 0 builds while the others wait, so no two processes write the same files.
        on_every_rank(lambda: env.is_main and ensure_demo_data(data_cfg.demo_dir, vocab_size=data_cfg.demo_vocab_size),
                      "build the demo data")
        tokenizer_path, shards = ensure_demo_data(data_cfg.demo_dir, vocab_size=data_cfg.demo_vocab_size)
        if data_cfg.format == "chat":  # the fine-tuning demo: Shakespeare's speeches as labelled pairs
            on_every_rank(lambda: env.is_main and ensure_demo_chat_data(data_cfg.demo_dir, tokenizer_path),
                          "build the demo's chat data")
            template, shards = ensure_demo_chat_data(data_cfg.demo_dir, tokenizer_path)
            data_cfg.template = str(template.resolve())
        shard_dirs = [str(shards.resolve())]
        # Recorded in the run's config.yaml, so exports and generate.py find the tokenizer.
        data_cfg.tokenizer, data_cfg.shards = str(tokenizer_path.resolve()), shard_dirs
    if not tokenizer_path:
        raise ValueError("data.tokenizer is not set: pass data.tokenizer=path/to/tokenizer.model (or data.demo=true)")
    if not shard_dirs:
        raise ValueError("data.shards is empty: pass data.shards=[path/to/shard_set] (built with "
                         "python -m data_pipeline build)")
    if not Path(tokenizer_path).exists():
        raise FileNotFoundError(f"data.tokenizer={tokenizer_path}: no such file or folder; train one with "
                                f"python -m data_pipeline train-tokenizer, or pass a tokenizer.json or its folder")
    tokenizer = Tokenizer(tokenizer_path, data_cfg.bos_token, data_cfg.eos_token)
    opened = dict(expect_tokenizer_sha256=tokenizer.sha256, verify=data_cfg.verify)
    train_sets = [ShardSet.open(d, split="train", **opened) for d in shard_dirs]
    val_sets = open_val_sets(data_cfg.val_sets, shard_dirs, opened)
    check_markers(tokenizer, train_sets + list(val_sets.values()))
    check_format(data_cfg, train_sets + list(val_sets.values()))
    positions = data_cfg.document_positions or data_cfg.document_masking  # masking needs the document starts
    loader = TokenLoader(train_sets if len(train_sets) > 1 else train_sets[0], seq_len=data_cfg.seq_len,
                         global_batch_size=global_batch_size, dp_rank=env.dp_rank, dp_size=env.dp_size,
                         seed=seed, weights=data_cfg.weights, return_positions=positions,
                         mask_boundary_loss=data_cfg.mask_boundary_loss, overlong=data_cfg.overlong,
                         adaptive=data_cfg.mixing == "adaptive")
    if env.is_main:
        log_packing(loader, data_cfg.overlong)
    baseline = None
    if data_cfg.unigram_baseline and val_sets and data_cfg.format == "text":  # chat: its loss is the answers' only
        baseline = unigram_cross_entropy(next(iter(val_sets.values())).root, tokenizer.vocab_size)
    return DataBundle(tokenizer, loader, val_sets, data_cfg.seq_len, env.dp_rank, env.dp_size, baseline,
                      positions, data_cfg.mask_boundary_loss, data_cfg.overlong)
