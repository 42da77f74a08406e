"""The DAG's task decorator: a TaskFlow task that owns the stage it starts.

``@stage_task(...)`` is ``@task(...)`` with an ``on_kill``: when Airflow kills the task (timeout,
cleared or marked failed while running, worker shutdown) it stops whatever the task's runner
registered in :mod:`~facial_r1_pipeline.runners.ownership`: the local stage's process group,
or the stage's pod or job (the provider operator's own ``on_kill`` deletes it through the
Kubernetes API). Imported by the DAG file at parse time, so it imports only Airflow's task
decorator machinery and the standard library.
"""

from __future__ import annotations

from collections.abc import Callable

from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk.bases.decorator import DecoratedOperator, task_decorator_factory

from . import ownership


class StageTaskOperator(DecoratedOperator, PythonOperator):
    """A ``@task`` whose ``on_kill`` stops the stage process, pod or job it started."""

    custom_operator_name = "@stage_task"
    template_fields = ("templates_dict", "op_args", "op_kwargs")

    def __init__(self, *, python_callable, op_args, op_kwargs, **kwargs) -> None:
        super().__init__(
            kwargs_to_upstream={
                "python_callable": python_callable,
                "op_args": op_args,
                "op_kwargs": op_kwargs,
            },
            python_callable=python_callable,
            op_args=op_args,
            op_kwargs=op_kwargs,
            **kwargs,
        )

    def on_kill(self) -> None:
        stopped = ownership.stop_all()
        self.log.warning(
            "task killed: stopped %s", ", ".join(stopped) if stopped else "nothing (no stage ran)"
        )
        super().on_kill()


def stage_task(python_callable: Callable | None = None, multiple_outputs: bool | None = None, **kw):
    """``@task`` for tasks that run stages through a runner (same arguments as ``@task``)."""
    return task_decorator_factory(
        python_callable=python_callable,
        multiple_outputs=multiple_outputs,
        decorated_operator_class=StageTaskOperator,
        **kw,
    )
