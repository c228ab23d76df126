"""The agent's side of a port-forward: one stream, one TCP connection to a port of the task.

The server asks for it in the heartbeat reply (`StreamOpen` of kind "port"); the agent has
opened the stream outbound already (agents/streams.py) and here connects it to the port, but
only when the task's own processes listen on it (agents/ports.py: jobs of other orgs share
the node's network), then splices bytes both ways (protocol/tcpstream.py). A task with a network
namespace of its own is connected to from inside it (agents/netns.py).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from agents.netns import NetnsError, entry, run_in_netns, thread_net_dir
from agents.ports import PortRefused, TaskProcesses, connect_owned
from protocol.streams import MAX_FRAME_BYTES, Error, control_text
from protocol.tcpstream import splice

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection


async def forward_port(
    websocket: ClientConnection,
    port: int | None,
    task: TaskProcesses | None,
    task_id: int,
    on_input: Callable[[], None] | None = None,
) -> None:
    """Connect the stream to `port` of the task, or tell the user why not (`on_input`: the
    client sent bytes, agents/idle.py)."""
    if port is None:
        await _refuse(websocket, "a port stream needs a port")
        return
    if task is None:
        await _refuse(websocket, f"task {task_id} is not running on this node")
        return
    try:
        pids = await asyncio.to_thread(task.pids)
        conn = await asyncio.to_thread(_connect, task, port, pids)
    except (PortRefused, NetnsError) as refused:
        await _refuse(websocket, str(refused))
        return
    reader, writer = await asyncio.open_connection(sock=conn, limit=MAX_FRAME_BYTES)
    await splice(websocket, reader, writer, on_input)


def _connect(task: TaskProcesses, port: int, pids: set[int]) -> socket.socket:
    """In the task's own network namespace when it has one: its listeners are there (and the
    node's port of the same number may be anyone's)."""
    netns = task.netns
    if netns is None:  # the node's network, which a task may have filled: ports only root has
        return connect_owned(port, pids, job_id=task.job_id, privileged_source=os.geteuid() == 0)
    return run_in_netns(
        entry(netns, pids),
        lambda: connect_owned(port, pids, job_id=task.job_id, net=thread_net_dir()),
    )


async def _refuse(websocket: ClientConnection, message: str) -> None:
    await websocket.send(control_text(Error(type="error", message=message)))
