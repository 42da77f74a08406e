"""Local runner: the stage runs as a process in the trainer environment (``.venv``).

The command is ``<repo>/.venv/bin/facial-r1 <stage> --config ... --set ... --result FILE
--parent-run-id ID``, started in the repository root with ``FACIAL_R1_HOME`` set, one torch
thread and Hugging Face offline. Its output is streamed line by line to the task log (and kept
in ``FILE.log``); the result JSON it writes atomically is read back and returned (XCom).

Resume rules, so that Airflow retries and re-runs neither redo nor corrupt work:

- nothing is ever deleted: a stage killed half way resumes from its own checkpoints/partial
  outputs when it is started again with the same outputs;
- a killed task kills its stage: the stage runs in its own process group, which the task's
  ``on_kill`` (:mod:`~facial_r1_pipeline.runners.ownership`) or an interruption ends whole;
- a finished stage is not run again: when ``FILE`` holds an ``ok`` result and ``FILE.spec.json``
  records the same fingerprint (command, overrides, profile text), the cached result is returned
  with ``"cached": true``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from facial_r1_core.schema import atomic_write

from ..launch import (
    DISTRIBUTED_STAGES,
    accelerate_config,
    free_port,
    is_distributed,
    launch_argv,
)
from ..specs import StageSpec
from .base import StageError, read_result
from .ownership import owned, stop_process_group

log = logging.getLogger("facial_r1.pipeline.local")

#: Environment every stage process gets (steady on 2-vCPU machines, offline model hubs).
STAGE_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
    "DO_NOT_TRACK": "1",
}


def default_executable(repo: Path) -> Path:
    """``<repo>/.venv/bin/facial-r1`` (override with ``FACIAL_R1_TRAINER_BIN``)."""
    override = os.environ.get("FACIAL_R1_TRAINER_BIN")
    return Path(override) if override else repo / ".venv" / "bin" / "facial-r1"


class LocalRunner:
    """Run stage specs as subprocesses of the trainer environment."""

    def __init__(
        self,
        repo: str | os.PathLike,
        executable: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
        echo: Callable[[str], None] | None = None,
    ):
        self.repo = Path(repo).resolve()
        self.executable = Path(executable) if executable else default_executable(self.repo)
        self.extra_env = dict(env or {})
        self.echo = echo or _echo

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The Airflow process may run in another venv: never leak its interpreter settings.
        for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
            env.pop(key, None)
        env.update(STAGE_ENV)
        env["FACIAL_R1_HOME"] = str(self.repo)
        env["PATH"] = f"{self.executable.parent}{os.pathsep}{env.get('PATH', '')}"
        env.update(self.extra_env)
        return env

    def _abs(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.repo / p

    def fingerprint(self, spec: StageSpec) -> str:
        config = self._abs(spec.config)
        text = config.read_text(encoding="utf-8") if config.is_file() else ""
        return spec.fingerprint(text)

    def cached(self, spec: StageSpec) -> dict[str, Any] | None:
        """The earlier ``ok`` result of exactly this spec, if there is one."""
        if not spec.result_path:
            return None
        result_file = self._abs(spec.result_path)
        marker = result_file.with_name(result_file.name + ".spec.json")
        if not (result_file.is_file() and marker.is_file()):
            return None
        try:
            recorded = json.loads(marker.read_text(encoding="utf-8")).get("fingerprint")
            if recorded != self.fingerprint(spec):
                return None
            result = read_result(result_file, stage=spec.stage)
        except (StageError, json.JSONDecodeError, OSError):
            return None
        return {**result, "cached": True}

    def node_commands(self, spec: StageSpec, argv: list[str]) -> list[list[str]]:
        """One command per node: ``argv`` itself, or (a training stage whose resources ask for
        ``nodes`` x ``processes`` > 1, or more than one GPU) a launcher per node on 127.0.0.1
        with a free port, built by the same :func:`~facial_r1_pipeline.launch.launch_argv` as
        the Kubernetes path: torchrun, or accelerate launch when the stage's section names an
        ``accelerate_config`` (CPU twin of a multi-node job: gloo, same stage command)."""
        if spec.command[:1] and spec.command[0] not in DISTRIBUTED_STAGES:
            return [argv]
        if not is_distributed(spec.resources):
            return [argv]
        from facial_r1_core.config import load_profile

        config_file = self._abs(spec.config)
        profile = load_profile(config_file, spec.overrides, strict=False)
        config = accelerate_config(profile, spec.command[0])  # DeepSpeed etc., as on Kubernetes
        python = str(self.executable.parent / "python")
        port = free_port()
        return [
            [
                *launch_argv(
                    spec.resources,
                    node_rank=rank,
                    master_addr="127.0.0.1",
                    master_port=port,
                    python=python,
                    accelerate_config=str(self._abs(config)) if config else None,
                ),
                *argv[1:],
            ]
            for rank in range(spec.resources.nodes)
        ]

    def _start(self, argv: list[str], stdout) -> subprocess.Popen:
        proc = subprocess.Popen(
            argv,
            cwd=self.repo,
            env=self.environment(),
            stdout=stdout,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            errors="replace",
            start_new_session=True,  # its own process group: killed whole on task kill
        )
        return proc

    def run(self, spec: StageSpec, context: Any = None) -> dict[str, Any]:
        """Run (or reuse) the stage; returns its result dict, raises StageError on failure."""
        if not self.executable.exists():
            raise StageError(
                f"{spec.stage}: trainer command not found at {self.executable} "
                "(run `make setup`, or set FACIAL_R1_TRAINER_BIN)",
                stage=spec.stage,
            )
        hit = self.cached(spec)
        if hit is not None:
            self.echo(
                f"[{spec.stage}] finished earlier with the same inputs: reusing "
                f"{spec.result_path} (delete it to force a re-run)"
            )
            return hit
        result_file = self._abs(spec.result_path) if spec.result_path else None
        if result_file is None:
            raise StageError(f"{spec.stage}: the spec has no result_path", stage=spec.stage)
        result_file.parent.mkdir(parents=True, exist_ok=True)
        # A stale result from an earlier, different spec must not be mistaken for this run's.
        if result_file.exists():
            result_file.replace(result_file.with_name(result_file.name + ".previous"))
        argv = spec.argv(str(self.executable), result_path=str(result_file))
        nodes = self.node_commands(spec, argv)
        self.echo(f"[{spec.stage}] $ {' '.join(nodes[0])}")
        started = time.monotonic()
        tail: collections.deque[str] = collections.deque(maxlen=40)
        log_path = result_file.with_name(result_file.name + ".log")
        with open(log_path, "a", encoding="utf-8") as log_file, contextlib.ExitStack() as logs:
            log_file.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} $ {' '.join(nodes[0])}\n")
            # node 0 streams to the task log; the other nodes (multi-node launches) to their own
            # log files next to it
            others = [
                self._start(
                    cmd, logs.enter_context(open(f"{log_path}.node{i}", "a", encoding="utf-8"))
                )
                for i, cmd in enumerate(nodes[1:], start=1)
            ]
            proc = self._start(nodes[0], subprocess.PIPE)
            group = [proc, *others]

            def stop_group() -> None:  # SIGTERM every node first: one grace period for all
                for p in group:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGTERM)
                for p in group:
                    stop_process_group(p)

            watcher = _watch_nodes(others, stop_group)
            try:
                with owned(f"{spec.stage} (pid {proc.pid})", stop_group):
                    assert proc.stdout is not None
                    for line in proc.stdout:
                        line = line.rstrip("\n")
                        tail.append(line)
                        log_file.write(line + "\n")
                        self.echo(f"[{spec.stage}] {line}")
                    code = proc.wait()
                    if code != 0:
                        for p in others:
                            stop_process_group(p)
                    codes = [p.wait() for p in others]
                    code = code or next((c for c in codes if c != 0), 0)
                    for i, c in enumerate(codes, start=1):
                        if c != 0:
                            tail.append(f"(node {i} exited with code {c}: {log_path}.node{i})")
            except BaseException:
                # The task is interrupted (timeout, Ctrl-C): SIGTERM the stage's process group
                # (checkpoints already saved stay), SIGKILL what is left after a grace period.
                stop_group()
                raise
            finally:
                if watcher is not None:
                    watcher.join(timeout=1)
        elapsed = time.monotonic() - started
        if code != 0:
            raise StageError(
                f"{spec.stage}: `{' '.join(argv[:2])}` exited with code {code} after "
                f"{elapsed:.1f}s; last output:\n" + "\n".join(tail),
                stage=spec.stage,
                exit_code=code,
                output_tail="\n".join(tail),
            )
        result = read_result(result_file, stage=spec.stage)
        result["runner_wall_time_s"] = round(elapsed, 3)
        marker = result_file.with_name(result_file.name + ".spec.json")
        with atomic_write(marker) as handle:
            json.dump({"fingerprint": self.fingerprint(spec), "argv": argv}, handle, indent=2)
        return result


def _watch_nodes(others: list[subprocess.Popen], stop: Callable[[], None]):
    """A thread that stops every node as soon as one of ``others`` fails (a dead node would
    leave the rest waiting in the rendezvous or a collective)."""
    if not others:
        return None
    import threading

    def watch() -> None:
        while any(p.poll() is None for p in others):
            if any(p.returncode not in (None, 0) for p in others):
                stop()
                return
            time.sleep(0.2)
        if any(p.returncode != 0 for p in others):
            stop()

    thread = threading.Thread(target=watch, name="node-watcher", daemon=True)
    thread.start()
    return thread


def _echo(line: str) -> None:
    print(line, file=sys.stdout, flush=True)
