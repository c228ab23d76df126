"""The agent's state directory: what must survive an agent restart.

    credential.json        node id, name and bearer token (mode 0600)
    tasks/<id>/record.json the task spec, pid and pid start time, seccomp filter, state, log and
                           report progress
    tasks/<id>/log.<offset> the task's combined stdout and stderr in at most two segments, each
                           named by the offset of its first byte (agents.logcap writes them)
    tasks/<id>/log         the same as one file, from tasks started before the copier existed
    tasks/<id>/output.lock held by the copier until it has written the task's last byte
    tasks/<id>/exit        the command's exit status, written by the launch wrapper
    tasks/<id>/sandbox.err why agents.sandbox could not start the task, when it could not

The directory is the agent's alone (0700, root in production): tasks run elsewhere, in their own
directories (agents.isolation), and never see the credential or another task's record.

Every write goes to a temporary file and is renamed into place, so a crash leaves either the old
or the new record, never half of one. A record is written *before* its process is started: a
crash between the two leaves a record without a pid, which recovery reports as lost rather than
starting the task again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from pathlib import Path

from pydantic import AwareDatetime, BaseModel

from agents.logcap import list_segments
from protocol.agent import TaskReport, TaskSpec
from protocol.states import TaskState


class Credential(BaseModel):
    server: str
    node_id: int
    node_name: str
    credential: str


class TaskRecord(BaseModel):
    """Everything the agent knows about one task; the report is derived from it."""

    spec: TaskSpec
    state: TaskState = "starting"
    pid: int | None = None
    pid_create_time: float | None = None
    """psutil's create time of `pid`: a live pid with another start time is a reused pid."""
    container_name: str | None = None
    seccomp: str | None = None
    """The seccomp filter the task's sandbox installed (its program, hex; "" for none): a new
    shell in the task gets this one, whatever `--seccomp` the agent runs with now. None in a
    record an agent wrote that did not keep it: the shell gets the agent's current filter."""
    started_at: AwareDatetime | None = None
    ended_at: AwareDatetime | None = None
    exit_code: int | None = None
    signal: int | None = None
    reason: str = ""
    stop_reason: str | None = None
    """Set when the server asked to stop it, or "time limit" when the agent did."""
    kill_at: AwareDatetime | None = None
    """When SIGKILL follows the SIGTERM already sent."""
    killed: bool = False
    warned: bool = False
    """The warning signal (`TaskSpec.signal`) was sent ahead of the time limit."""
    log_base_bytes: int = 0
    """Bytes dropped from the front of a single-file `log` (size cap): offsets continue past it.
    Segmented logs carry this in their names."""
    log_shipped_bytes: int = 0
    """Logical offset up to which the server has acknowledged the log."""
    log_complete: bool = False
    final_acked: bool = False
    """The server acknowledged the final report; kept only so the task never starts again."""

    @property
    def task_id(self) -> int:
        return self.spec.task_id

    def report(self) -> TaskReport:
        return TaskReport(
            task_id=self.spec.task_id,
            job_id=self.spec.job_id,
            state=self.state,
            pid=self.pid,
            started_at=self.started_at,
            ended_at=self.ended_at,
            exit_code=self.exit_code,
            signal=self.signal,
            reason=self.reason[:1024],
        )


def write_atomic(path: Path, data: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class StateDir:
    def __init__(self, root: Path) -> None:
        self.root = root.absolute()  # tasks run in their own working directories
        self.tasks_dir = self.root / "tasks"
        self.tasks_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    # credential
    @property
    def credential_path(self) -> Path:
        return self.root / "credential.json"

    def load_credential(self) -> Credential | None:
        try:
            return Credential.model_validate_json(self.credential_path.read_text())
        except FileNotFoundError:
            return None

    def save_credential(self, credential: Credential) -> None:
        write_atomic(self.credential_path, credential.model_dump_json(), mode=0o600)

    def forget_credential(self) -> None:
        self.credential_path.unlink(missing_ok=True)

    # tasks
    def task_dir(self, task_id: int) -> Path:
        return self.tasks_dir / str(task_id)

    def log_path(self, task_id: int) -> Path:
        return self.task_dir(task_id) / "log"

    def exit_path(self, task_id: int) -> Path:
        return self.task_dir(task_id) / "exit"

    def output_lock_path(self, task_id: int) -> Path:
        return self.task_dir(task_id) / "output.lock"

    def sandbox_error_path(self, task_id: int) -> Path:
        """Written by agents.sandbox when it cannot confine and start the task."""
        return self.task_dir(task_id) / "sandbox.err"

    def log_segments(self, record: TaskRecord) -> list[tuple[int, Path]]:
        """(offset of the first byte, path) of the parts of a task's log on disk, oldest first."""
        directory = str(self.task_dir(record.task_id))
        segments = [(start, Path(path)) for start, path in list_segments(directory)]
        single = self.log_path(record.task_id)
        if not segments and single.exists():
            segments.append((record.log_base_bytes, single))
        return segments

    def read_log(self, record: TaskRecord) -> bytes:
        """What the node still holds of a task's log (for people and tests; agents.logs ships)."""
        data = bytearray()
        for _start, path in self.log_segments(record):
            try:
                data += path.read_bytes()
            except FileNotFoundError:
                continue  # dropped while reading: the copier moved on
        return bytes(data)

    def save(self, record: TaskRecord) -> None:
        """Without the job's environment and secret: a task never starts from its record
        (recovery only adopts or settles), so they never need to touch the disk."""
        directory = self.task_dir(record.task_id)
        directory.mkdir(exist_ok=True)
        data = record.model_dump_json(exclude={"spec": {"env", "job_secret"}})
        write_atomic(directory / "record.json", data, mode=0o600)

    def load_all(self) -> list[TaskRecord]:
        records = []
        for path in sorted(self.tasks_dir.glob("*/record.json")):
            try:
                records.append(TaskRecord.model_validate_json(path.read_text()))
            except (OSError, ValueError):
                continue  # an unreadable record cannot be acted on; leave it for an operator
        return records

    def remove(self, task_id: int) -> None:
        directory = self.task_dir(task_id)
        for child in directory.glob("*"):
            child.unlink(missing_ok=True)
        for child in directory.glob(".*"):
            child.unlink(missing_ok=True)
        directory.rmdir()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def agent_tag(state_root: Path) -> str:
    """What names this agent's things that live beyond it on a host several agents may share
    (network namespaces, its nftables table, docker's containers): 8 hex digits of its state
    directory's path, so two agents on one host never share a name."""
    return hashlib.sha256(str(state_root.resolve()).encode()).hexdigest()[:8]
