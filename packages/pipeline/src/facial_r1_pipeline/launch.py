"""Multi-process stage launches: one argument builder for the local runner and for Kubernetes.

A training stage whose resources ask for more than one process (``resources.stages.<stage>``:
``nodes`` x ``processes``, where ``processes`` 0 means one per GPU) runs the same stage command,
``facial-r1 <stage> ...`` (as the module ``facial_r1_core.cli``), under a launcher on every node:

- ``torchrun`` (``python -m torch.distributed.run``) with a static rendezvous at node 0:
  ``--nnodes N --nproc-per-node P --node-rank R --master-addr A --master-port PORT``;
- ``accelerate launch`` with the same five numbers (``--num_machines``, ``--num_processes``
  = N x P, ``--machine_rank``, ``--main_process_ip``, ``--main_process_port``) when the stage's
  profile section names an ``accelerate_config`` (DeepSpeed ZeRO-3 on the GPU profile), since
  that file carries the DeepSpeed settings; accelerate starts torchrun itself.

The local runner starts N such launchers on 127.0.0.1 (node rank 0..N-1, a free port); the
Kubernetes runner renders one Indexed Job whose pod ``i`` is node rank ``i`` and whose master is
pod 0's stable DNS name (:func:`facial_r1_pipeline.k8s.render_multinode`). Every worker process
gets ``RANK`` / ``WORLD_SIZE`` from the launcher; the stage contract then lets only global rank 0
write the result, the stage state and the MLflow run.

>>> from facial_r1_pipeline.specs import Resources
>>> res = Resources(nodes=2, processes=1)
>>> launch_argv(res, node_rank=1, master_addr="127.0.0.1", master_port=29400, python="py")
['py', '-m', 'torch.distributed.run', '--nnodes', '2', '--nproc-per-node', '1', '--node-rank', \
'1', '--master-addr', '127.0.0.1', '--master-port', '29400', '--max-restarts', '0', '-m', \
'facial_r1_core.cli']
>>> is_distributed(Resources()), is_distributed(Resources(gpus=8)), world_size(res)
(False, True, 2)
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

from .specs import STAGE_SECTION, Resources

#: The stage command as a module (what ``facial-r1`` runs), for launchers that take ``-m``.
STAGE_MODULE = "facial_r1_core.cli"
#: Training stages that may run on several processes / nodes.
DISTRIBUTED_STAGES = ("sft", "grpo")


def processes_per_node(res: Resources) -> int:
    """Workers per node: ``processes``, else one per GPU, else one."""
    return int(res.processes or res.gpus or 1)


def world_size(res: Resources) -> int:
    return int(res.nodes) * processes_per_node(res)


def is_distributed(res: Resources) -> bool:
    """True when the stage runs as more than one process (a launcher is needed)."""
    return world_size(res) > 1


def accelerate_config(profile: Mapping[str, Any] | None, stage: str) -> str | None:
    """The ``accelerate_config`` of a stage's profile section, if any."""
    section = (profile or {}).get(STAGE_SECTION.get(stage, stage)) or {}
    value = section.get("accelerate_config") if isinstance(section, Mapping) else None
    return str(value) if value else None


def launch_argv(
    res: Resources,
    *,
    node_rank: int | str,
    master_addr: str,
    master_port: int | None = None,
    python: str = "python",
    accelerate_config: str | None = None,
) -> list[str]:
    """The launcher command line for one node (the stage's own arguments follow it).

    ``node_rank`` may be a placeholder such as ``$(FACIAL_R1_NODE_RANK)`` that Kubernetes
    expands from the container's environment.
    """
    nnodes, nproc = int(res.nodes), processes_per_node(res)
    port = str(master_port if master_port is not None else res.rdzv_port)
    if accelerate_config:
        return [
            "accelerate",
            "launch",
            "--config_file",
            accelerate_config,
            "--num_machines",
            str(nnodes),
            "--num_processes",
            str(nnodes * nproc),
            "--machine_rank",
            str(node_rank),
            "--main_process_ip",
            master_addr,
            "--main_process_port",
            port,
            "--rdzv_backend",
            "static",
            "--max_restarts",
            "0",
            "-m",
            STAGE_MODULE,
        ]
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(nnodes),
        "--nproc-per-node",
        str(nproc),
        "--node-rank",
        str(node_rank),
        "--master-addr",
        master_addr,
        "--master-port",
        port,
        "--max-restarts",
        "0",  # Airflow owns retries; a failed worker fails the stage
        "-m",
        STAGE_MODULE,
    ]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the local rendezvous port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
