"""What a running task owns (a stage's process group, pod or job), and stopping it on kill.

A runner registers how to stop the stage it started for as long as the stage runs::

    with owned("sft (pid 4242)", lambda: stop_process_group(proc)):
        ...wait for the stage...

The DAG's tasks are :class:`~facial_r1_pipeline.runners.airflow_task.StageTaskOperator`s, whose
``on_kill`` calls :func:`stop_all`. Airflow calls ``on_kill`` in the task process when the task
times out (``execution_timeout``), is cleared or marked failed while running, or its worker shuts
down: the stage's whole process group is killed, and its pod or job is deleted through the
Kubernetes API, instead of running on with nobody waiting for it.

``on_kill`` may run inside a signal handler of the thread that registered the stage, so nothing
here takes a lock.

>>> calls = []
>>> with owned("demo", lambda: calls.append("stopped")):
...     stop_all()
['demo']
>>> calls, active()
(['stopped'], [])
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator

log = logging.getLogger("facial_r1.pipeline.ownership")

_ACTIVE: dict[int, tuple[str, Callable[[], None]]] = {}
_KEYS = itertools.count()

#: Seconds a stage gets between SIGTERM and SIGKILL (Airflow escalates to SIGKILL of the task
#: itself about 5-10 s after its first signal, so the stage must be gone by then).
STOP_GRACE_S = 5.0


@contextlib.contextmanager
def owned(what: str, stop: Callable[[], None]) -> Iterator[None]:
    """Register ``stop`` (how to end ``what``) while the block runs."""
    key = next(_KEYS)
    _ACTIVE[key] = (what, stop)
    try:
        yield
    finally:
        _ACTIVE.pop(key, None)


def active() -> list[str]:
    """What is currently owned (descriptions, oldest first)."""
    return [what for _, (what, _) in sorted(_ACTIVE.items())]


def stop_all() -> list[str]:
    """Stop everything owned; returns what was stopped. A failing stop is logged, not raised."""
    stopped = []
    for key, (what, stop) in sorted(_ACTIVE.items()):
        try:
            stop()
            stopped.append(what)
        except Exception:
            log.exception("could not stop %s", what)
        finally:
            _ACTIVE.pop(key, None)
    return stopped


def stop_process_group(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the process group led by ``proc`` (started with ``start_new_session=True``),
    then SIGKILL whatever is left of the group after ``grace_s`` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # children that outlived their leader, too
