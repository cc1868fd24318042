"""Processes: the checks that the processes `accelerate launch` started form one group, and the process state
generation and evaluation run in."""

from __future__ import annotations

import os

from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from .config import ConfigError


def process_state():
    """This process's place among the ones `accelerate launch` started (alone when run directly).

    Only an `Accelerator` reads ACCELERATE_USE_CPU; a bare `PartialState` on a machine without GPUs
    ignores it, and then every launched process would make and write every image itself."""
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    check_process_group(state.num_processes)
    return state


def check_process_group(num_processes: int) -> None:
    """Refuse N launched processes that each run alone: they would all write the same files."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != num_processes:
        raise ConfigError(f"{launched} processes were launched but they did not join one process group "
                          f"(each sees {num_processes}); on a machine without GPUs set ACCELERATE_USE_CPU=1, "
                          "which accelerate launch does not pass on from use_cpu: true")


