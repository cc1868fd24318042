"""Running well on a CPU: torch threads on the cores that are free, and a heap that keeps what a training step
frees for the next one. GPU runs skip both (their host threads and host heap barely matter)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys

import psutil
import torch
from accelerate.utils import parse_flag_from_env

from .config import Config

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def set_up_cpu(config: Config) -> None:
    """For a run on the CPU: `set_cpu_threads` and `keep_freed_heap`."""
    if torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU"):
        return
    set_cpu_threads(config)
    keep_freed_heap()


def set_cpu_threads(config: Config) -> None:
    """Give a CPU run the machine's cores: `accelerate launch` sets OMP_NUM_THREADS=1 unless told otherwise,
    which halves the speed of the embedded default on 2 cores.

    Cores that other programs keep busy (over a quarter second measured now) are left out: torch's threads
    wait for each other at every operation, so a thread that has to share its core holds up all of them
    (issue 13: all cores of a busy 2-core machine ran 6x slower than 1 thread)."""
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
        return
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    busy = round(psutil.cpu_percent(interval=0.25) / 100 * cores)  # in cores; this process sleeps meanwhile
    threads = max(1, (cores - busy) // local_processes)
    torch.set_num_threads(threads)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"cpu_threads: {threads} per process ({cores} physical cores, ~{busy} busy with other work, "
              f"{local_processes} local process(es)); set cpu_threads to choose")


def _glibc():
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    library = ctypes.CDLL(name) if name else None
    return library if library is not None and hasattr(library, "mallopt") else None


def keep_freed_heap() -> None:
    """Keep the memory a training step frees for the next step instead of handing it back to the OS.

    glibc serves each allocation over 128 KiB from a fresh mmap and returns it on free, and trims the heap
    whenever 128 KiB at its top are free: every step then page-faults its activations in again (and the
    kernel zeroes each page). With allocations up to 32 MiB kept in the heap, 256 MiB of free heap kept and
    64 MiB asked for at a time, the embedded default's UNet step took 318-351 ms instead of 399-407 ms
    (benchmarks/step_speed.py, AMD EPYC, 2 threads). `return_freed_memory` still trims on purpose. Only
    glibc has mallopt; elsewhere this does nothing."""
    libc = _glibc()
    if libc is None:
        return
    for parameter, value in ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 256 << 20), (M_TOP_PAD, 64 << 20)):
        libc.mallopt(parameter, value)


def return_freed_memory() -> None:
    """Hand the heap that start-up used and freed back to the OS. Building the tokenizer from every caption
    and listing the data files take memory in proportion to the data set (~200 MB at 100k images); glibc
    keeps what was freed, and the run would carry it to the end. Only glibc has malloc_trim."""
    libc = _glibc()
    if libc is not None:
        gc.collect()
        libc.malloc_trim(0)
