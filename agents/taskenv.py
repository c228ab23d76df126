"""What a task's environment holds: the little it inherits of the agent's, then fairgpu's
variables and the job's own."""

from __future__ import annotations

import os
from pathlib import Path

from agents import sandbox
from protocol.agent import TaskSpec

# Variables of the agent's own environment a task inherits; nothing else (no agent secrets).
# HOME is the task's own directory; USER and LOGNAME would name the agent's user.
_INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "TZ")


def task_environment(spec: TaskSpec, *, cuda_by_uuid: bool, home: Path) -> dict[str, str]:
    """The variables fairgpu sets for a task, on top of the job's own environment."""
    env = dict(spec.env)
    env.setdefault("TMPDIR", "/tmp")  # noqa: S108 - private to the task under strict isolation
    visible = spec.gpu_uuids if cuda_by_uuid and spec.gpu_uuids else [str(g) for g in spec.gpus]
    env.update(
        CUDA_VISIBLE_DEVICES=",".join(visible),
        FAIRGPU_JOB_ID=str(spec.job_id),
        FAIRGPU_TASK_ID=str(spec.task_id),
        FAIRGPU_NODE_RANK=str(spec.node_rank),
        FAIRGPU_NUM_NODES=str(spec.num_nodes),
        FAIRGPU_GPUS_PER_NODE=str(len(spec.gpus)),
        HOME=str(home),
    )
    if spec.job_secret:
        env["FAIRGPU_JOB_SECRET"] = spec.job_secret
    if spec.num_nodes > 1:
        env.update(NODE_RANK=str(spec.node_rank), WORLD_SIZE=str(spec.num_nodes))
        if spec.master_addr:
            env["MASTER_ADDR"] = spec.master_addr
        if spec.master_port:
            env["MASTER_PORT"] = str(spec.master_port)
    return env


def launch_environment(
    spec: TaskSpec, *, cuda_by_uuid: bool, home: Path, carried: bool = False
) -> dict[str, str]:
    """A task's whole environment: what it inherits of the agent's, then fairgpu's and the
    job's variables (`task_environment`). `carried`: the command gets them otherwise (from the
    sandbox, or a container's environment file), and root's processes before it, which must
    not see the job's variables, have them only under a prefix none of them reads
    (sandbox.carried)."""
    inherited = {k: os.environ[k] for k in _INHERITED_ENV if k in os.environ}
    env = inherited | task_environment(spec, cuda_by_uuid=cuda_by_uuid, home=home)
    return sandbox.carried(env, inherited) if carried else env
