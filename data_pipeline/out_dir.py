"""Where a build may write: never over its own inputs or tokenizer, and over nothing but a previous shard set.

A build replaces its out_dir as a whole (build beside it, then rename), so whatever out_dir holds is gone
afterwards: these checks decide, before any work, whether that loses nothing but an older build.
"""

import glob
import json
import re
import shutil
from pathlib import Path

MANIFEST = "manifest.json"
SPLITS = ("train", "val")
SHARD_FILE = re.compile(r"\d{6}(\.mask)?\.bin")  # what ShardWriter names its files (a chat set's masks: .mask)


def _relation(out: Path, path: Path) -> str | None:
    """How out_dir overlaps a path the build reads, in words, or None."""
    if out == path:
        return "is"
    if out in path.parents:
        return "contains"
    if path in out.parents:
        return "lies inside"
    return None


def check_apart(out_dir, inputs, files: list[str], tokenizer_path) -> None:
    """Refuse an out_dir that is, contains or lies inside one of the build's inputs or its tokenizer."""
    out = Path(out_dir).resolve()
    inputs = [inputs] if isinstance(inputs, (str, Path)) else inputs
    named = [i for i in map(str, inputs) if not i.startswith("hf:") and not glob.has_magic(i)]
    reads = [("input", p) for p in dict.fromkeys(named + [f for f in files if not f.startswith("hf:")])]
    for what, path in reads + [("tokenizer", str(tokenizer_path))]:
        relation = _relation(out, Path(path).resolve())
        if relation:
            raise ValueError(f"out_dir={out_dir} {relation} the build's {what} {path}; a build replaces its "
                             f"out_dir, so choose an out_dir apart from the inputs and the tokenizer")


def read_fingerprint(manifest_path: Path) -> str | None:
    """The build fingerprint a manifest of ours records; None for anything else (absent, unreadable, foreign)."""
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ours = isinstance(manifest, dict) and {"format_version", "fingerprint", "splits"} <= manifest.keys()
    return manifest["fingerprint"] if ours else None


def _foreign(out_dir: Path) -> str | None:
    """Why out_dir is not just a finished build, and the fix, in words (None: a shard set and nothing else)."""
    if read_fingerprint(out_dir / MANIFEST) is None:
        return f"is not one (it has no {MANIFEST} written by a build); choose another out_dir"
    for entry in sorted(out_dir.iterdir()):
        if entry.name == MANIFEST:
            continue
        if entry.name not in SPLITS or entry.is_symlink() or not entry.is_dir():
            return f"also holds {entry.name}, which a build does not write; move that out or choose another out_dir"
        for f in sorted(entry.iterdir()):
            if not SHARD_FILE.fullmatch(f.name) or f.is_symlink() or not f.is_file():
                return (f"also holds {entry.name}/{f.name}, which a build does not write; move that out or "
                        f"choose another out_dir")
    return None


def up_to_date(out_dir: Path, fingerprint: str, overwrite: bool) -> bool:
    """True when out_dir already holds this very build; False when it may be (re)built; raises, naming out_dir and
    why, when it holds anything a build may not replace."""
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise NotADirectoryError(f"out_dir={out_dir} is a file; choose another out_dir")
    found = read_fingerprint(out_dir / MANIFEST)
    if found == fingerprint:
        return True  # the same command already finished: nothing to do
    if not any(out_dir.iterdir()):
        return False
    if not overwrite:
        what = "a shard set built from other inputs/settings/tokenizer; pass overwrite=true" if found else \
            "files and is not a shard set; empty it"
        raise ValueError(f"out_dir={out_dir}: holds {what} or choose another out_dir")
    foreign = _foreign(out_dir)
    if foreign:
        raise ValueError(f"out_dir={out_dir}: overwrite=true replaces only a previous shard set, and this folder "
                         f"{foreign}")
    return False


def replace(staging: Path, out_dir: Path) -> None:
    """Move the finished build into place: out_dir is absent, the old set, or the new one, never a mix."""
    if not out_dir.exists() and not out_dir.is_symlink():
        staging.rename(out_dir)
        return
    trash = out_dir.parent / f".{out_dir.name}.old"
    shutil.rmtree(trash, ignore_errors=True)
    out_dir.rename(trash)
    staging.rename(out_dir)
    if trash.is_symlink():  # out_dir was a link to a set: drop the link only
        trash.unlink()
    else:
        shutil.rmtree(trash)
