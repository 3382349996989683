"""Progress of long work, readable in a terminal and in a log.

On a terminal (stderr is a TTY) a rich bar with the time left; otherwise (a CI log, `| tee`,
a service) a plain line on stderr when a step starts and at most every LINE_SECONDS, with the
share done and an estimate of the time left, also sent to the `lowbit` logger. Both take the
part of rich.progress.Progress's API that lowbit uses: add_task, advance and update.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

LOG = logging.getLogger("lowbit")
LINE_SECONDS = 10.0


class LineProgress:
    """Progress as plain lines on stderr (see the module docstring)."""

    def __init__(self) -> None:
        self.tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for task in self.tasks.values():
            if task["total"] and task["done"] >= task["total"]:
                self._say(task, force=True)

    def add_task(self, description: str, total: float | None = None, **_: Any) -> int:
        identifier = len(self.tasks)
        now = time.monotonic()
        self.tasks[identifier] = {"description": description, "total": total, "done": 0.0,
                                  "start": now, "said": now - LINE_SECONDS, "said_done": -1.0}
        self._say(self.tasks[identifier], force=True)
        return identifier

    def advance(self, task_id: int, advance: float = 1.0) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, advance: float = 0.0, description: str | None = None, **_: Any) -> None:
        task = self.tasks[task_id]
        task["done"] += advance
        changed = description is not None and description != task["description"]
        if changed:
            task["description"] = description
        self._say(task, force=changed)

    def _say(self, task: dict[str, Any], force: bool) -> None:
        now = time.monotonic()
        if not force and now - task["said"] < LINE_SECONDS:
            return
        task["said"] = now
        elapsed = now - task["start"]
        total, done = task["total"], task["done"]
        line = f"lowbit: {task['description']}"
        if total:
            line += f": {done:g}/{total:g} ({done / total:.0%}), {elapsed:.0f} s"
            if 0 < done < total:
                line += f", about {elapsed * (total - done) / done:.0f} s left"
        elif done:
            line += f": {done:g} steps, {elapsed:.0f} s"
        print(line, file=sys.stderr, flush=True)
        LOG.info(line)


def progress_bar(enabled: bool = True) -> Any:
    """A progress display for long work: a rich bar on a terminal, lines on stderr otherwise,
    nothing when not `enabled`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if enabled and not sys.stderr.isatty():
        return LineProgress()
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=True,
                    disable=not enabled)
