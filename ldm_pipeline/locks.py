"""One job at a time in a directory: a training run in its output_dir, a latent cache build in its cache.

The lock is `flock` on `<directory>/.ldm_pipeline.lock`: the OS drops it when the holding process ends,
however it ends (SIGKILL too), so a lock file left behind never blocks the next job.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".ldm_pipeline.lock"


@contextmanager
def directory_lock(directory, setting: str, job: str, error: type[Exception], hold: bool = True):
    """Hold an exclusive lock on `directory` (the value of config `setting`) for a whole `job`; only one
    process of a multi-process job takes it (`hold`). A second job gets one `error` naming the holder.
    Folders made here only to hold the lock are removed again if the job leaves them empty (a refused job
    leaves nothing behind)."""
    if not hold:
        yield
        return
    directory = Path(directory)
    created = [folder for folder in (directory, *directory.parents) if not folder.exists()]  # innermost first
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    handle = _take_lock(path, lambda holder: error(
        f"{setting}: {directory} is in use by another {job} ({holder}; lock file {path}). Wait for that {job} "
        f"to finish, or choose another {setting}. The lock ends with its process, even a killed one, so there "
        "is no stale lock to delete."))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        handle.close()
        for folder in created:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def _take_lock(path: Path, refusal):
    """The open, locked lock file with this process's name in it; `refusal(holder)` is raised when another
    process holds it."""
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "a process that has not written its pid yet"
            handle.close()
            raise refusal(holder) from None
        # The holder removes the file when it finishes: if that happened between our open and our lock,
        # we locked a file that no longer has this name, so take the lock again on the current one.
        if path.exists() and os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle
