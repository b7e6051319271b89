"""The run's append-only JSONL files (metrics.jsonl, the sample ledger): opened to append after a last line
torn by a write that failed is cut off, so that every line stays one whole record across restarts; records
of steps a resumed run re-does can be removed first."""

import json
import logging
import os
from pathlib import Path

from data_pipeline.disk import write_atomically

log = logging.getLogger("train")


def open_to_append(path: Path):
    """path opened to append lines of text; a last line without its newline (a full disk stopped its write) is
    removed first, with a warning, rather than run into the next record."""
    if path.exists():
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            keep = _end_of_last_line(f, size)
            if keep < size:
                f.truncate(keep)
                log.warning("%s: removed a last line torn by a write that failed (%d bytes)", path, size - keep)
    return open(path, "a")


def _end_of_last_line(f, size: int) -> int:
    """The offset just past the file's last newline (0 when it has none), read backwards in 64 KiB pieces."""
    end = size
    while end > 0:
        start = max(0, end - (1 << 16))
        f.seek(start)
        newline = f.read(end - start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


def drop_records_after(path: Path, step: int) -> int:
    """Removes path's records of steps after `step`, replacing the file atomically; returns how many. Lines that
    do not parse are kept as they are (a torn last line is open_to_append's to cut, with its warning)."""
    if not path.is_file():  # missing, or not a regular file (a device never ends: it is not read)
        return 0
    *lines, torn = path.read_bytes().split(b"\n")
    kept = [line for line in lines if _step_of(line) <= step]
    if len(kept) < len(lines):
        write_atomically(path, b"".join(line + b"\n" for line in kept) + torn)
    return len(lines) - len(kept)


def _step_of(line: bytes) -> float:
    """The record's step; minus infinity (kept whatever the step) for a line that is not a record with one."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, TypeError, KeyError):
        return float("-inf")
    return step if isinstance(step, int) else float("-inf")
