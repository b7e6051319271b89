"""`key=value` command-line arguments (the style of launch/pretrain.py) for the small tools."""

import gc
import os
import sys


def parse_key_values(argv: list[str], spec: dict[str, type], required: tuple[str, ...], usage: str) -> dict:
    """{key: typed value} from `key=value` words; exits 1 with a one-line error on bad input."""
    values = {}
    for word in argv:
        if word in ("-h", "--help"):
            print(usage)
            sys.exit(0)
        key, sep, raw = word.removeprefix("--").partition("=")
        if not sep or key not in spec:
            fail(f"unexpected argument {word!r}; expected key=value with key one of {sorted(spec)}")
        try:
            values[key] = spec[key](raw)
        except ValueError:
            fail(f"{key}={raw!r} is not a valid {spec[key].__name__}")
    for key in required:
        if key not in values:
            fail(f"missing {key}=...; run with --help for usage")
    return values


# What a run raises for bad input or a failed write (missing file, no permission, full disk, too
# little memory, a hung peer): the entry points turn these into one line, not a traceback.
RUN_ERRORS = (ValueError, OSError, MemoryError, TimeoutError)


ERROR_LINES_ENV = "LLM_PRETRAIN_ERROR_LINES"  # a folder where each rank's fail() leaves its line (launch/launcher.py)


def fail(message: str, status: int = 1) -> None:
    """Exit `status` with one line: `error: ...`, or `error (rank N): ...` under torchrun. The line goes out in
    one write: ranks share the pipe, and print() writes the text and the newline separately, which
    let two ranks' lines run together."""
    rank = os.environ.get("RANK")
    line = f"error{'' if rank is None else f' (rank {rank})'}: {message}\n"
    said = os.environ.get(ERROR_LINES_ENV)
    if said:  # under launch/launcher.py, which reports one rank's line: torchrun's records cannot say who printed
        try:
            with open(os.path.join(said, f"rank{rank}"), "w") as f:
                f.write(f"{status} {line}")
        except OSError:
            pass  # the console line still goes out
    sys.stderr.write(line)
    sys.stderr.flush()
    release_failed_run()
    sys.exit(status)


def release_failed_run() -> None:
    """Free what the error being handled still holds, while the interpreter is whole. Its traceback keeps the
    failed run's frames (their process groups, TCPStore) alive in reference cycles; left to the interpreter's
    teardown, the gloo and TCPStore threads were met unjoined at times, and the process aborted after its
    one line with "terminate called without an active exception"."""
    error = sys.exc_info()[1]
    while error is not None:
        error.__traceback__ = None
        error = error.__cause__ or error.__context__
    gc.collect()
