"""An exclusive inter-process file lock (fcntl), released when the holder exits or crashes."""

import contextlib
import fcntl
import os
from pathlib import Path


@contextlib.contextmanager
def file_lock(path):
    """Hold an exclusive lock on `path` (created if missing) for the duration of the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks while another process builds the same thing
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
