"""Pretrain a Llama: `torchrun --nproc_per_node=N launch/pretrain.py +conf=NAME [key=value ...]`, or on one
process `llm-pretrain +conf=NAME [key=value ...]` (the installed command: the same main).

Presets live in conf/NAME.yaml; every key of train/config.py can be overridden on the command line.
"""

import gc
import os
import sys
from pathlib import Path

from launch import launcher
from train.loop import signals
from train.observe import logs

REPO = Path(__file__).resolve().parent.parent  # the checkout (installed editable): conf/ and Hydra's search path


def train(composed) -> None:
    """One run of the config Hydra composed, in the run folder it made."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError

    from launch.cli_args import RUN_ERRORS, fail

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        train_cfg = OmegaConf.to_object(composed)  # a TrainConfig dataclass
    except InterpolationResolutionError as e:  # a `${...}` in a preset (the command line's are checked first)
        fail(f"{e.full_key}: {str(e).splitlines()[0]}; a preset's ${{key}} must name another config key")
    try:
        train_cfg.check(int(os.environ.get("WORLD_SIZE", "1")))  # before torch's imports: a bad value fails in 1 s
        signals.release_term()
        from train.loop.job import run

        result = run(train_cfg, run_dir)
    except RUN_ERRORS as e:
        fail(str(e), getattr(e, "exit_status", 1))  # one line naming the key or file, no traceback
    if result.get("stopped"):
        signals.mark_stopped()  # for launch/slurm/torchrun.py: this worker stopped cleanly
        sys.exit(signals.EXIT_STOPPED)  # checkpointed after a stop signal: requeue to continue


def main() -> None:
    """`llm-pretrain` and `torchrun launch/pretrain.py`: the signal handlers first, then the slow imports, the
    command line's check and the run. `llm-pretrain --nproc_per_node=N ...` starts N of them (launch/launcher.py)."""
    launcher.main(sys.argv[1:], Path(__file__))  # returns unless the command starts with torchrun's options
    signals.catch_early()  # first, before the slow imports and start-up: see train/loop/signals.py
    logs.guard_console()  # a closed stdout or stderr (`... | tee log`, then Ctrl-C) must not end the run
    signals.watch_launcher()  # torchrun killed: end too, instead of training on as an orphan
    import hydra  # the slow imports: here, after the handlers above

    from launch.cli_args import fail
    from train import config

    config.register()
    problem = config.check_overrides(sys.argv[1:], REPO / "conf")
    if problem:
        fail(problem)
    try:
        hydra.main(config_path=str(REPO), config_name="pretrain", version_base="1.3")(train)()
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


if __name__ == "__main__":
    main()
