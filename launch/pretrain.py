"""Pretrain a Llama: `torchrun --nproc_per_node=N launch/pretrain.py +conf=NAME [key=value ...]`.

Presets live in conf/NAME.yaml; every key of train/config.py can be overridden on the command line.
"""

import gc
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from train.loop import signals  # noqa: E402
from train.observe import logs  # noqa: E402

signals.catch_early()  # first, before the slow imports and start-up: see train/loop/signals.py
logs.guard_console()  # a closed stdout or stderr (`... | tee log`, then Ctrl-C) must not end the run
signals.watch_launcher()  # torchrun killed: end too, instead of training on as an orphan

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from omegaconf.errors import InterpolationResolutionError  # noqa: E402

from launch.cli_args import RUN_ERRORS, fail  # noqa: E402
from train import config  # noqa: E402

config.register()


@hydra.main(config_path="..", config_name="pretrain", version_base="1.3")
def main(cfg) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        typed = OmegaConf.to_object(cfg)  # a TrainConfig dataclass
    except InterpolationResolutionError as e:  # a `${...}` in a preset (the command line's are checked first)
        fail(f"{e.full_key}: {str(e).splitlines()[0]}; a preset's ${{key}} must name another config key")
    try:
        typed.check(int(os.environ.get("WORLD_SIZE", "1")))  # before torch's imports: a bad value fails in 1 s
        signals.release_term()
        from train.loop.job import run

        result = run(typed, run_dir)
    except RUN_ERRORS as e:
        fail(str(e), getattr(e, "exit_status", 1))  # one line naming the key or file, no traceback
    if result.get("stopped"):
        signals.mark_stopped()  # for launch/slurm/torchrun.py: this worker stopped cleanly
        sys.exit(signals.EXIT_STOPPED)  # checkpointed after a stop signal: requeue to continue


if __name__ == "__main__":
    problem = config.check_overrides(sys.argv[1:], REPO / "conf")
    if problem:
        fail(problem)
    try:
        main()
    except SystemExit as end:
        if end.code != signals.EXIT_STOPPED and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # An error on one of several ranks after the config check: keep the slower teardown, which
            # gives the other ranks time to print their own line before torchrun, seeing this one end,
            # stops them.
            raise
        gc.freeze()
        raise
    # A run that ended as planned exits in a fraction of a second instead of one or two: the interpreter's
    # teardown would otherwise run full garbage collections over the ~300k objects torch's modules hold.
    # What must reach the disk is closed by now (metrics, ledger, W&B, the process group), and the atexit
    # handlers (logging's flush) still run.
    gc.freeze()
