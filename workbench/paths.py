"""Where the workbench keeps its store and its model cache, and how many CPU threads torch uses."""

from __future__ import annotations

import os
from pathlib import Path


def workbench_home() -> Path:
    """The default store directory: `WORKBENCH_HOME`, else `~/.workbench`."""
    return Path(os.environ.get("WORKBENCH_HOME") or Path.home() / ".workbench").expanduser()


def cache_dir() -> Path:
    """Model cache (dequantized weights and the like), shared by every store on this machine.

    `WORKBENCH_CACHE` overrides it; the default lives outside any store so a fresh temporary
    store (tests, notebooks) does not pay the one-off model conversion again.
    """
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "workbench"
    return Path(os.environ.get("WORKBENCH_CACHE") or default).expanduser()


def configure_threads() -> int:
    """Use one torch thread per CPU this process may run on (or `WORKBENCH_THREADS`).

    torch's default counts every core of the host; on a shared small machine that
    oversubscribes and slows every forward badly, so the count is set deliberately.
    """
    import torch

    requested = os.environ.get("WORKBENCH_THREADS")
    n = int(requested) if requested else len(os.sched_getaffinity(0))
    n = max(1, n)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
