"""Progress bars of long loops. On a terminal they are tqdm's; inside a job worker (`reporting`)
each bar's updates go to a callback instead, so the job's driver can show and record per-unit
progress from other processes and nodes. Methods import `tqdm` from here, not from tqdm."""

from __future__ import annotations

import io
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

from tqdm import tqdm as _plain_tqdm
from tqdm.auto import tqdm as _terminal_tqdm

Report = Callable[[str, int, "int | None"], None]  # (description, done, total)
_report: ContextVar[Report | None] = ContextVar("workbench_progress_report", default=None)


class _ReportingTqdm(_plain_tqdm):
    """A bar that draws nothing and hands (desc, n, total) to the report callback when tqdm would redraw."""

    def __init__(self, *args, report: Report, **kwargs):
        self._report_to = report
        super().__init__(*args, **{**kwargs, "file": io.StringIO()})

    def display(self, msg=None, pos=None):
        self._report_to(self.desc, int(self.n), None if self.total is None else int(self.total))
        return True


def tqdm(*args, **kwargs):
    """tqdm on a terminal, or a reporting bar inside `reporting(...)`."""
    report = _report.get()
    if report is None:
        return _terminal_tqdm(*args, **kwargs)
    return _ReportingTqdm(*args, report=report, **kwargs)


@contextmanager
def reporting(report: Report) -> Iterator[None]:
    """Send the progress of every bar opened in this block to `report`."""
    token = _report.set(report)
    try:
        yield
    finally:
        _report.reset(token)
