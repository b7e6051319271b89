"""A loop hook (`hooks=[exit_threads:ExitThreads]`, tests/support on PYTHONPATH) that, as the process exits (an
atexit handler: after the entry point's last line, before the interpreter's teardown), writes the names of the
native threads still running to the file EXIT_THREADS names, one per line. Linux only (/proc/self/task)."""

import atexit
import os
from pathlib import Path

ENV = "EXIT_THREADS"
HOOK = "exit_threads:ExitThreads"


def _record() -> None:
    names = sorted((task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir())
    Path(os.environ[ENV]).write_text("\n".join(names) + "\n")


class ExitThreads:
    def __init__(self):
        atexit.register(_record)

    def on_start(self, trainer) -> None:
        pass
