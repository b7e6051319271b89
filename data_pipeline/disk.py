"""Writing files: a full disk becomes one line naming the folder and the file; whole-file atomic replacement."""

import contextlib
import errno
import os
import tempfile
from pathlib import Path

# a full disk, a full quota, or a file-size limit (RLIMIT_FSIZE, a filesystem's largest file): all "no space"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class NoSpaceError(OSError):
    """A write that failed for want of space; its message is the whole story, in one line."""


def no_space(e: BaseException, path, what: str | None = None,
             fix: str = "free some space or write elsewhere") -> NoSpaceError | None:
    """A NoSpaceError naming the file and its folder (or the folder path and `what` was written into it) when e,
    or an error behind it, is a full disk; else None."""
    while e is not None:
        if isinstance(e, NoSpaceError):
            return e
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            file = Path(e.filename or path)
            folder, written = (Path(path), what) if what else (file.parent, file.name)
            return NoSpaceError(f"no space left on {folder} while writing {written} ({e.strerror}); {fix}")
        e = e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def writing(path):
    """Around the writes of one file: a full disk raises NoSpaceError naming it, other errors pass unchanged."""
    try:
        yield
    except OSError as e:
        full = no_space(e, path)
        if full is None:
            raise
        raise full from None


def write_atomically(path, data: bytes):
    """Replace path with data: readers see the old file or the new one, never half of one; a failure
    (a full disk included) leaves the old file and no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with writing(path), os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
