"""Initial weights that do not depend on how the model is split.

Each parameter's values are a function of (seed, parameter name, element position) alone: the parameter,
seen as a matrix (rows = its first dimension), is cut into fixed tiles, and each tile is drawn by its own
generator, seeded from the seed, the name and the tile's index. A rank holding a shard of the parameter
(a box of rows and columns, from FSDP or tensor parallelism) draws only the tiles that overlap its box
and keeps the overlap, so one process and any layout start from bit-identical weights, and no rank ever
makes a whole parameter it does not hold: its working memory is one tile per drawing thread.

Tiles are drawn on the CPU (torch's Mersenne Twister) and copied to the shard's device, so a GPU run also
starts from the CPU's weights; this costs about 3 s per 10^9 parameters and CPU core.
"""

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

# A tile is at most TILE_COLS columns wide and TILE_ELEMENTS in all (4 MiB of fp32): rows are cheap to
# skip for FSDP's row shards, and tensor parallelism's column shards (wo, w2) waste at most one tile's width.
TILE_COLS, TILE_ELEMENTS = 4096, 1 << 20
# Wrappers that parallelism adds to a block's names (activation checkpointing, torch.compile).
WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.")


@dataclass
class Shard:
    """The part of a parameter that a rank holds: `local` is rows offset[0]:offset[0] + local rows and
    columns offset[1]:... of the whole parameter, shape[0] x (the rest of shape, flattened)."""

    local: torch.Tensor
    shape: tuple[int, ...]
    offset: tuple[int, int] = (0, 0)


def canonical_name(name: str) -> str:
    """A parameter's name in the plain model, whatever wraps its block."""
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def as_matrix(shape) -> tuple[int, int]:
    rows = shape[0] if len(shape) else 1
    return rows, math.prod(shape) // max(rows, 1)


def tile_shape(shape) -> tuple[int, int]:
    rows, cols = as_matrix(shape)
    tile_cols = min(cols, TILE_COLS) or 1
    return max(1, TILE_ELEMENTS // tile_cols), tile_cols


def tile_seed(seed: int, name: str, i: int, j: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{i}/{j}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _overlap(start: int, size: int, tile: int, index: int, total: int) -> tuple[slice, slice]:
    """The tile's part of [start, start + size): as a slice of the tile and of the shard."""
    lo, hi = max(start, index * tile), min(start + size, (index + 1) * tile, total)
    return slice(lo - index * tile, hi - index * tile), slice(lo - start, hi - start)


def workers() -> int:
    """Threads drawing tiles: this node's cores shared among its ranks (torchrun's LOCAL_WORLD_SIZE), at most 16."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(16, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


@torch.no_grad()
def normal_shard(shard: Shard, std: float, seed: int, name: str) -> None:
    """Fill shard.local with N(0, std) values of the whole parameter `name` at its positions."""
    rows, cols = as_matrix(shard.shape)
    local_rows, local_cols = as_matrix(shard.local.shape) if shard.local.numel() else (0, 0)
    if local_rows == 0 or local_cols == 0:
        return
    local = shard.local.view(local_rows, local_cols)  # (rows held, columns held)
    tr, tc = tile_shape(shard.shape)
    r0, c0 = shard.offset

    @torch.no_grad()  # here too: grad mode is per thread
    def fill(ij: tuple[int, int]) -> None:
        i, j = ij
        tile = torch.empty(min(tr, rows - i * tr), min(tc, cols - j * tc))  # the whole tile; edge tiles smaller
        tile.normal_(0.0, std, generator=torch.Generator().manual_seed(tile_seed(seed, name, i, j)))
        tile_rows, shard_rows = _overlap(r0, local_rows, tr, i, rows)
        tile_cols, shard_cols = _overlap(c0, local_cols, tc, j, cols)
        local[shard_rows, shard_cols].copy_(tile[tile_rows, tile_cols])

    tiles = [(i, j) for i in range(r0 // tr, (r0 + local_rows - 1) // tr + 1)
             for j in range(c0 // tc, (c0 + local_cols - 1) // tc + 1)]
    threads = min(workers(), len(tiles))
    if threads == 1:
        for ij in tiles:
            fill(ij)
        return
    with ThreadPoolExecutor(threads) as pool:  # drawing releases the GIL; each tile lands in its own box
        list(pool.map(fill, tiles))
