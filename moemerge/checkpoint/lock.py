"""One process at a time per output or work folder: a lock file beside the folder names who holds it.

Two runs writing one output would interleave shards, or one would move its folder over the
other's. So every command that writes a folder first takes `folder_lock(folder)`: an exclusive
`flock` on `.NAME.lock` next to it, with the holder's pid, host and command written inside. A
second process is refused at once with a one-line error quoting them.

A lock never goes stale: the kernel drops a `flock` when its process ends, however it ends, so
the file a killed run leaves behind is simply taken over by the next one (its old contents are
only reported while some live process holds the lock). The holder is also the only process that
may tidy the folder's leftovers: a previous run's unfinished temporary folders, and the previous
output when a replacement was killed between moving it aside and moving the new one in.

Under torchrun only rank 0 (which writes) takes the lock; the other ranks share its folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moemerge.checkpoint.reader import CheckpointError

_HELD: dict[Path, tuple[int, int]] = {}
"""Locks this process holds: lock file -> (descriptor, depth); a nested `folder_lock` on one folder is free."""


class FolderInUse(CheckpointError):
    """Another live process holds the folder's lock."""


def lock_file(folder: Path) -> Path:
    """The lock file of `folder`: hidden, beside it (the folder itself may not exist yet)."""
    folder = Path(folder).absolute()
    return folder.parent / f".{folder.name}.lock"


def _holder_text() -> str:
    return json.dumps(
        {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": shlex.join([Path(sys.orig_argv[0]).name, *sys.orig_argv[1:]]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )


def _describe(raw: bytes) -> str:
    try:
        holder = json.loads(raw)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet written its name"


def _acquire(path: Path, folder: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raw = os.read(fd, 4096)
            os.close(fd)
            raise FolderInUse(
                f"{folder}: in use by another moemerge run ({_describe(raw)}); wait for it or stop it"
            ) from None
        try:  # the previous holder unlinks the file on release: our lock may be on a file no longer there
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(fd, 0)
            os.write(fd, _holder_text().encode())
            return fd
        os.close(fd)


def _recover(folder: Path) -> None:
    """Tidy what a killed run of `folder` left (only the lock holder may): see the module docstring."""
    if not folder.exists():
        aside = sorted(folder.parent.glob(f".{folder.name}.old-*"))
        if len(aside) == 1:  # killed mid-replacement: the previous output is still whole
            aside[0].rename(folder)
    for leftover in folder.parent.glob(f".{folder.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def folder_lock(folder: str | Path) -> Iterator[None]:
    """Hold `folder` for this process until the block ends; `FolderInUse` names the holder otherwise."""
    folder = Path(folder).absolute()
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 holds it for every rank
        yield
        return
    path = lock_file(folder)
    if path in _HELD:
        fd, depth = _HELD[path]
        _HELD[path] = (fd, depth + 1)
    else:
        _HELD[path] = (_acquire(path, folder), 1)
        _recover(folder)
    try:
        yield
    finally:
        fd, depth = _HELD.pop(path)
        if depth > 1:
            _HELD[path] = (fd, depth - 1)
        else:
            path.unlink(missing_ok=True)
            os.close(fd)
