"""One owner per run folder: ``<run>/.lock`` holds the owner's pid and host.

The lock itself is an ``fcntl.flock`` on that file, which the kernel drops when the owning
process dies however it dies (SIGKILL included), so a lock can never be left held by a dead
process. The pid/host text is for people: a second ``train`` or ``--resume`` into a live run
is refused naming the owner, and a file left by a dead owner is taken over with a note.
The file is emptied, not removed, on release: removing it would let two later runs lock two
different files of the same name.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from phi4mm_lora.errors import UserError

LOCK_FILE = ".lock"


class RunLock:
    """Held for the life of a training run (main process only)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fh = None
        self._created = False
        self.took_over: str | None = None

    def acquire(self) -> RunLock:
        self._created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "another process"
            fh.close()
            raise UserError(f"run folder {self.path.parent} is in use by {owner}; wait for it to finish, stop it, "
                            "or choose another output_dir") from None
        fh.seek(0)
        previous = fh.read().strip()
        if previous:
            self.took_over = previous
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        os.fsync(fh.fileno())
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is None:
            return
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.flush()
        if self._created and [p.name for p in self.path.parent.iterdir()] == [LOCK_FILE]:
            # a run that failed before writing anything leaves no folder behind (still locked
            # while removing, so no other run can be inside it)
            self.path.unlink()
            self.path.parent.rmdir()
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
        self._fh.close()
        self._fh = None


def owner_of(run_dir: Path) -> str | None:
    """Who holds the run folder now (None when nobody): a cheap check for ``validate``."""
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return fh.read().strip() or "another process"
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return None


__all__ = ["LOCK_FILE", "RunLock", "owner_of"]
