"""Processes: the checks that the processes `accelerate launch` started form one group, the process state
generation and evaluation run in, the group's timeout, and what a collective that gave up says."""

from __future__ import annotations

import os
import re
import traceback
from datetime import timedelta
from pathlib import Path

import torch.distributed
from accelerate import PartialState
from accelerate.utils import DistributedType, InitProcessGroupKwargs, parse_flag_from_env

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




def check_fsdp(distributed_type: DistributedType) -> None:
    """Refuse a launch that asked for FSDP (fsdp.yaml, --use_fsdp) which Accelerate does not shard: it enables FSDP
    only for GPUs and other accelerators, and on CPU processes (ACCELERATE_USE_CPU) it would train as plain DDP."""
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and distributed_type != DistributedType.FSDP:
        raise ConfigError(f"the launcher asked for FSDP, but Accelerate runs these processes as "
                          f"{distributed_type.value} (it shards only on GPUs and other accelerators, not on CPU "
                          "processes); launch with "
                          "multi_gpu.yaml, or cpu_2proc.yaml on CPUs, for data-parallel training with full copies")


def process_group_kwargs(timeout_seconds: int) -> InitProcessGroupKwargs:
    """The process group's timeout (`distributed_timeout`): how long a collective waits for the others (gloo's
    timeout, NCCL's watchdog)."""
    timeout = timedelta(seconds=timeout_seconds)
    if timeout == InitProcessGroupKwargs().timeout:
        # Accelerate passes on only the values that differ from its handler's defaults (600 s, NCCL's), so 600 s
        # would reach a gloo group as torch's 30 minutes (huggingface/accelerate#2611): a millisecond more is passed.
        timeout += timedelta(milliseconds=1)
    return InitProcessGroupKwargs(timeout=timeout)


def failed_collective(error: BaseException) -> bool:
    """Whether `error` is a collective giving up because another process died (its connections closed) or did not
    answer within the group's timeout. gloo raises a plain RuntimeError that names its source file; torch's store
    and NCCL raise `DistError`."""
    gloo = isinstance(error, RuntimeError) and "/gloo/" in str(error)
    return gloo or isinstance(error, torch.distributed.DistError)


def describe_failed_collective(error: BaseException) -> str:
    """The collective that gave up, the line of this package that ran it and torch's reason, in one line: e.g.
    "DDP's gradient all-reduce in backward (ldm_pipeline/loop.py:166 in fit: accelerator.backward(loss)) gave up:
    Timed out waiting 20000ms for recv operation to complete"."""
    frames = traceback.extract_tb(error.__traceback__)
    package = Path(__file__).parent
    ours = [frame for frame in frames if Path(frame.filename).parent == package]
    # torch's collectives are functions of distributed_c10d.py (all_reduce, barrier, broadcast, ...); DDP launches
    # its gradient all-reduce from C++ during backward, so no Python frame names it.
    named = [frame.name for frame in frames if frame.filename.endswith("distributed_c10d.py")]
    collective = named[-1] if named else ("DDP's gradient all-reduce in backward"
                                          if any(frame.name == "backward" for frame in frames) else "a collective")
    if ours:
        frame = ours[-1]
        collective += f" ({package.name}/{Path(frame.filename).name}:{frame.lineno} in {frame.name}: {frame.line})"
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    reason = re.sub(r"^\[[^\]]*\]\s*", "", first_line).split(". This is typically")[0]  # gloo's "[file:line] "
    return f"{collective} gave up: {reason}"
