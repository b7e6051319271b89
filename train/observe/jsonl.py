"""The run's append-only JSONL files (metrics.jsonl, the sample ledger): opened to append after a last line
torn by a write that failed is cut off, so that every line stays one whole record across restarts; records
of steps a resumed run re-does can be removed first."""

import json
import logging
import os
from pathlib import Path

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
    """Removes path's records of steps after `step` from its end, in place; returns how many. The file is read
    backwards only as far as its last record of a step <= `step` (the ledger keeps its records in step order: a
    rollback removes those of the steps it undoes), so a start costs the same at step 20 and at step 20,000. A
    line that is not a record with a step ends the search and stays; a torn last line is kept for
    open_to_append to cut, with its warning."""
    if not path.is_file():  # missing, or not a regular file (a device never ends: it is not read)
        return 0
    with open(path, "rb+") as f:
        end = _end_of_last_line(f, f.seek(0, os.SEEK_END))
        cut, removed = end, 0
        for start, line in _lines_backwards(f, end):
            if _step_of(line) <= step:
                break
            cut, removed = start, removed + 1
        if removed:
            f.seek(end)
            torn = f.read()
            f.truncate(cut)  # then the torn rest back after it: a crash in between loses only that
            f.seek(cut)
            f.write(torn)
    return removed


def _lines_backwards(f, end: int):
    """(offset, line) of each whole line before `end` (just past a newline), the last line first, read in
    64 KiB pieces."""
    buf, base, stop = b"", end, 0  # buf holds the file's bytes from offset `base`; lines not yet given end at stop
    while base + stop > 0:
        newline = buf.rfind(b"\n", 0, stop - 1) if stop else -1  # the end of the line before the last one
        if newline < 0 and base > 0:  # the line starts before the bytes read so far
            start = max(0, base - (1 << 16))
            f.seek(start)
            buf = f.read(base - start) + buf[:stop]
            base, stop = start, stop + base - start
            continue
        yield base + newline + 1, buf[newline + 1:stop - 1]
        stop = newline + 1


def _step_of(line: bytes) -> float:
    """The record's step; minus infinity (kept whatever the step) for a line that is not a record with one."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, TypeError, KeyError):
        return float("-inf")
    return step if isinstance(step, int) else float("-inf")
