"""Parts to one shard set: each split's streams concatenated in part order and cut into shards of shard_tokens, byte
for byte what one pass over all documents writes. Aligned parts' shards are hard-linked; heads and tails are copied
(see parts.py)."""

from pathlib import Path

from .parts import SPLITS, Plan
from .shard_writer import ShardWriter


def merge_parts(plan: Plan, records: dict, set_dir: Path, shard_tokens: int, vocab_size: int) -> dict:
    """Write (or link) every split's shards under set_dir; the manifest's `splits`."""
    splits = {}
    for split in SPLITS:
        writer = ShardWriter(set_dir, split, shard_tokens, vocab_size)
        for k in range(len(plan.ranges)):
            _append(writer, plan, k, records[k]["splits"][split])
        splits[split] = writer.finish()
    return splits


def _append(writer: ShardWriter, plan: Plan, k: int, part: dict):
    """Part k's stream of writer's split: head, whole shards, tail."""
    if part["offset"] is not None and part["offset"] != writer.tokens:  # only a part of another build could
        raise ValueError(f"part {k} of {len(plan.ranges)} ({plan.path(k)}) was cut for {part['offset']:,} "
                         f"{writer.split} tokens before it, but parts 0-{k - 1} hold {writer.tokens:,}; delete it and "
                         f"build it again (rerun array task {k})")
    folder = plan.path(k) / writer.split
    writer.add_file(folder / "head.tok", plan.dtype)
    for entry in part["shards"]:
        writer.add_shard(plan.path(k) / entry["file"], entry)
    writer.add_file(folder / "tail.tok", plan.dtype)
    writer.documents += part["documents"]
