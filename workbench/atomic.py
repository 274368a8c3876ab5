"""The one atomic writer: a directory or file is written completely under a staging name and then
renamed into place. A rename is atomic, so a reader sees nothing or the whole thing, whatever
instant a writer is killed at. Staging directories are named `<pid>-<hex>` so `workbench gc` can
tell a dead writer's leftovers from a live one's.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def staging_name() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex}"


def writer_pid(name: str) -> int | None:
    """The pid of the writer that made a staging entry, or None for a foreign name."""
    pid = name.lstrip(".").split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(final: Path, staging: Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty directory under `staging` (on `final`'s filesystem); when the block ends
    without error, its files are synced and it becomes `final`. If `final` exists by then (another
    writer won), that one stands unless `replace`. On error nothing reaches `final`."""
    staging.mkdir(parents=True, exist_ok=True)
    tmp = staging / staging_name()
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        final.parent.mkdir(parents=True, exist_ok=True)
        if replace and final.exists():
            old = staging / f"{staging_name()}-replaced"
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
        else:
            fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_file_atomic(path: Path, data: str | bytes) -> None:
    """Write one file so that readers see the old content or the new, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{staging_name()}-{path.name}")
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
