"""The launching process and the ranks it started: it exits only after all of them.

On one machine Lightning's ``_SubprocessScriptLauncher`` starts ranks 1..N-1 as child processes of
rank 0 (``launcher.procs``), and a watcher thread SIGKILLs every process, rank 0 included, once a
child exits with a non-zero status. A scheduler waits on rank 0 alone, so rank 0 must not exit
before its children (a sharded checkpoint would lose the parts they still write), and a child
that exits 143 after a SIGTERM stop must not get rank 0 killed in the middle of its own stop.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any, Optional

# After a stop that every rank takes part in (SIGTERM, the end of training): the others have
# already saved and only tear down; after rank 0 alone stopped with an error: the others may be
# waiting in a collective that will never complete, so they are killed sooner.
STOP_TIMEOUT_S = 120.0
ERROR_TIMEOUT_S = 10.0

_held: list[subprocess.Popen] = []


def hold_child_ranks(trainer: Any) -> None:
    """Take the ranks this process started away from Lightning's watcher (which watches
    ``launcher.procs`` itself; emptied, it stops): from now on :func:`wait_for_child_ranks`
    answers for them. Nothing to do on a rank that started none."""
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    procs = getattr(launcher, "procs", None)
    if procs:
        _held.extend(procs)
        procs.clear()


def wait_for_child_ranks(
    trainer: Any, timeout_s: float, expected: Optional[int] = None
) -> list[str]:
    """Wait until every rank this process started has exited, at most ``timeout_s`` in all; one
    still running then is killed. Returns a line for each rank killed or, when ``expected`` is
    set, ended with another exit status."""
    hold_child_ranks(trainer)
    children, _held[:] = list(_held), []
    deadline = time.monotonic() + timeout_s
    problems = []
    for local_rank, proc in enumerate(children, start=1):
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            problems.append(
                f"local rank {local_rank} (PID {proc.pid}) was still running {timeout_s:.0f} s after "
                "this process stopped; it was killed"
            )
            continue
        if expected is not None and proc.returncode != expected:
            problems.append(
                f"local rank {local_rank} (PID {proc.pid}) exited with status {proc.returncode}"
            )
    return problems
