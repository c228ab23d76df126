"""Holds an interactive task's pseudo-terminal, so that terminal streams can attach and detach.

Run by path (`python -I -S ptyhost.py SOCKET_DIR ATTACH_WAIT_S COMMAND...`) between the launch
wrapper and the task's command (with its sandbox prefix), so it imports only the standard
library. It starts the command as the leader of a new session whose controlling terminal is a
new pty, once the first client has sent a frame (its window size: nothing the command prints
is missed) or after ATTACH_WAIT_S without one, and then:

- copies everything the terminal prints to its stdout (the task's log, as for any task);
- listens on `SOCKET_DIR/pty.sock` (the agent's own directory, hidden from tasks; only this
  process's uid may connect) for the agent's stream relays (agents/streams.py), which get the
  same output and send input, window sizes and signals in frames (`FRAME_*` below);
- reads no more output while a connected client has `BACKLOG_BYTES` unsent, and takes no more
  input while the terminal has that much unwritten: back-pressure both ways, bounded memory;
- shows a notice the agent sends (the idle timeout's warning, agents/idle.py) to every client
  and in the log, as output of the terminal's own but not on the command's input;
- forwards SIGTERM and SIGHUP (a stop, a time limit) to the session, whose leader it is not;
- when the command exits, sends the rest of the output and its exit status (a signal as 128+N,
  as a shell reports it) to every client, and exits with that status.

Living outside the agent, the terminal survives an agent restart as the task itself does.

With `--new WATCH_FD` first (`fairgpu attach --new`, agents/shells.py) it hosts a new shell in a
running task's sandbox instead: nothing runs unless a client comes within ATTACH_WAIT_S, and the
shell is hung up (SIGHUP, SIGTERM, then SIGKILL after HANGUP_S) once its last client has left
or the task has ended (WATCH_FD, a pidfd of the task's wrapper, becomes readable), as a
terminal whose connection drops is.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import selectors
import signal
import socket
import struct
import sys
import termios
import time

FRAME_DATA, FRAME_RESIZE, FRAME_SIGNAL, FRAME_EXIT = b"D", b"R", b"S", b"X"
FRAME_REFUSED = b"E"  # the host refuses this client (the payload says why), then closes
FRAME_NOTICE = b"N"  # the agent's line for every client and the log, not the command's input
HEADER = struct.Struct(">cI")  # frame type, payload length
MAX_PAYLOAD = 1024 * 1024
READ_BYTES = 128 * 1024
BACKLOG_BYTES = 256 * 1024
SOCKET_NAME = "pty.sock"
MAX_CLIENTS = 8
"""Attached at once; each may hold BACKLOG_BYTES here, so this bounds the host's memory."""
DRAIN_S = 0.2
"""After the command exits: how long output its leftovers still print is waited for."""
HANGUP_S = 2.0
"""A new shell hung up: how long it has to end before SIGKILL."""


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


class Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbox = b""
        self.outbox = bytearray()


class Host:
    def __init__(
        self, master: int, listener: socket.socket, wakeup: int, watch: int | None = None
    ) -> None:
        self.master = master
        self.wakeup = wakeup  # signal.set_wakeup_fd's pipe: SIGCHLD ends the wait at once
        self.listener = listener
        self.watch = watch
        """A pidfd of the task's wrapper (a new shell's host): readable once the task ended."""
        self.task_ended = False
        self.heard = False
        """A client has sent its first frame (the CLI's window size): the command may start."""
        self.clients: dict[int, Client] = {}
        self.to_terminal = bytearray()
        self.selector = selectors.DefaultSelector()
        self.terminal_open = True

    # output ---------------------------------------------------------------------------------
    def read_terminal(self) -> bool:
        """What the terminal has printed, up to READ_BYTES in one frame; False when nothing
        was there or it has closed (EIO). A pty hands out at most a few KiB per read: reading
        on while more is ready makes one frame (one hop per relay) of many reads."""
        chunks: list[bytes] = []
        size = 0
        while size < READ_BYTES:
            try:
                data = os.read(self.master, READ_BYTES - size)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                data = b""
            if not data:
                self.terminal_open = False
                break
            chunks.append(data)
            size += len(data)
        if not chunks:
            return False
        data = b"".join(chunks)
        _write_all(1, data)
        message = frame(FRAME_DATA, data)
        for client in self.clients.values():
            client.outbox += message
        return True

    def backlogged(self) -> bool:
        return any(len(c.outbox) >= BACKLOG_BYTES for c in self.clients.values())

    # clients --------------------------------------------------------------------------------
    def accept(self) -> None:
        sock, _ = self.listener.accept()
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.getuid():  # only the agent that started this task
            sock.close()
            return
        if len(self.clients) >= MAX_CLIENTS:
            with contextlib.suppress(OSError):
                reason = f"the terminal has {MAX_CLIENTS} clients attached already".encode()
                sock.send(frame(FRAME_REFUSED, reason))
            sock.close()
            return
        sock.setblocking(False)
        self.clients[sock.fileno()] = Client(sock)

    def drop(self, client: Client) -> None:
        self.clients.pop(client.sock.fileno(), None)
        client.sock.close()

    def receive(self, client: Client) -> None:
        try:
            data = client.sock.recv(READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.drop(client)
            return
        client.inbox += data
        while len(client.inbox) >= HEADER.size:
            kind, length = HEADER.unpack_from(client.inbox)
            if length > MAX_PAYLOAD:
                self.drop(client)
                return
            if len(client.inbox) < HEADER.size + length:
                break
            payload = client.inbox[HEADER.size : HEADER.size + length]
            client.inbox = client.inbox[HEADER.size + length :]
            self.control(kind, payload)

    def control(self, kind: bytes, payload: bytes) -> None:
        if kind == FRAME_NOTICE:
            self.notice(payload)
            return
        self.heard = True
        if kind == FRAME_DATA:
            self.to_terminal += payload
        elif kind == FRAME_RESIZE and len(payload) == 4:
            rows, cols = struct.unpack(">HH", payload)
            # The kernel sends SIGWINCH to the terminal's foreground process group.
            with contextlib.suppress(OSError):
                fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        elif kind == FRAME_SIGNAL:
            group = _foreground_group(self.master)
            with contextlib.suppress(OSError, ValueError):
                if group is not None:
                    os.killpg(group, signal.Signals(int(payload)))

    def notice(self, text: bytes) -> None:
        _write_all(1, text)
        message = frame(FRAME_DATA, text)
        for client in self.clients.values():
            client.outbox += message

    def send(self, client: Client) -> None:
        try:
            sent = client.sock.send(client.outbox)
        except BlockingIOError:
            return
        except OSError:
            self.drop(client)
            return
        del client.outbox[:sent]

    def write_terminal(self) -> None:
        try:
            written = os.write(self.master, self.to_terminal)
        except BlockingIOError:
            return
        except OSError:
            self.to_terminal.clear()  # the terminal is gone; input has nowhere to go
            return
        del self.to_terminal[:written]

    # loop -----------------------------------------------------------------------------------
    def step(self, timeout_s: float) -> None:
        """One round of the loop: register what each side may do now, then do it."""
        selector = self.selector
        for key in list(selector.get_map().values()):
            selector.unregister(key.fileobj)
        events_master = 0
        if self.terminal_open and not self.backlogged():
            events_master |= selectors.EVENT_READ
        if self.to_terminal and self.terminal_open:
            events_master |= selectors.EVENT_WRITE
        if events_master:
            selector.register(self.master, events_master, "master")
        selector.register(self.listener, selectors.EVENT_READ, "listener")
        selector.register(self.wakeup, selectors.EVENT_READ, "wakeup")
        if self.watch is not None and not self.task_ended:
            selector.register(self.watch, selectors.EVENT_READ, "watch")
        for client in self.clients.values():
            events = 0 if len(self.to_terminal) >= BACKLOG_BYTES else selectors.EVENT_READ
            if client.outbox:
                events |= selectors.EVENT_WRITE
            if events:
                selector.register(client.sock, events, client)
        for key, mask in selector.select(timeout_s):
            if key.data == "master":
                if mask & selectors.EVENT_READ:
                    self.read_terminal()
                if mask & selectors.EVENT_WRITE:
                    self.write_terminal()
            elif key.data == "listener":
                self.accept()
            elif key.data == "wakeup":
                with contextlib.suppress(OSError):
                    os.read(self.wakeup, 4096)
            elif key.data == "watch":
                self.task_ended = True
            elif isinstance(key.data, Client) and key.data.sock.fileno() in self.clients:
                if mask & selectors.EVENT_WRITE:
                    self.send(key.data)
                if mask & selectors.EVENT_READ and key.data.sock.fileno() in self.clients:
                    self.receive(key.data)

    def finish(self, status: int) -> None:
        """The rest of the output, then the exit status, to every client (a few seconds at
        most for a client that does not read)."""
        deadline = time.monotonic() + DRAIN_S
        while self.terminal_open and time.monotonic() < deadline:
            if not self.read_terminal():
                time.sleep(0.01)
        exit_frame = frame(FRAME_EXIT, str(status).encode())
        for client in self.clients.values():
            client.outbox += exit_frame
        deadline = time.monotonic() + 5.0
        while any(c.outbox for c in self.clients.values()) and time.monotonic() < deadline:
            for client in list(self.clients.values()):
                if client.outbox:
                    self.send(client)
            time.sleep(0.005)
        for client in list(self.clients.values()):
            self.drop(client)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BrokenPipeError:
            return  # the log copier is gone; the terminal still works


def _open_terminal() -> tuple[int, int]:
    """A new pty, 24x80 until a client says otherwise; (master, slave)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    os.set_blocking(master, False)
    return master, slave


def _spawn(command: list[str], master: int, slave: int) -> int:
    """The command as a new session's leader with the pty as its controlling terminal."""
    pid = os.fork()
    if pid == 0:
        try:
            os.close(master)
            os.setsid()
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
            for fd in (0, 1, 2):
                os.dup2(slave, fd)
            if slave > 2:
                os.close(slave)
            os.environ.setdefault("TERM", "xterm")
            os.execvp(command[0], command)  # noqa: S606 - the task's argv, no shell
        except OSError as exc:
            os.write(2, f"fairgpu: cannot start {command[0]}: {exc.strerror}\r\n".encode())
        os._exit(127)
    os.close(slave)
    return pid


def _listen(directory: str) -> socket.socket:
    """The clients' socket; bound through the directory's fd so that a long path still fits."""
    dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    try:
        path = f"/proc/self/fd/{dir_fd}/{SOCKET_NAME}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            listener.bind(path)
        finally:
            os.umask(old_umask)
    finally:
        os.close(dir_fd)
    listener.listen(8)
    listener.setblocking(False)
    return listener


def _foreground_group(master: int) -> int | None:
    """The terminal's foreground process group; None when it has none. Once the session's
    leader has exited, tcgetpgrp gives 0, and killpg(0) signals the caller's own group: the
    host, its wrapper and the log copier. A stop's SIGTERM arriving then came back to the host,
    which forwarded it again, until a RecursionError ended the host before its exit frame."""
    try:
        group = os.tcgetpgrp(master)
    except OSError:
        return None
    return group if group > 0 else None


def _signal_session(child: int, master: int, sig: signal.Signals) -> None:
    """`sig` to the command's session leader's group and the terminal's foreground group."""
    with contextlib.suppress(OSError):
        os.killpg(child, sig)
    group = _foreground_group(master)
    if group is not None:
        with contextlib.suppress(OSError):
            os.killpg(group, sig)


def _wait_command(host: Host, child: int, *, new: bool) -> int:
    """Relay until the command exits; its wait status. A new shell whose last client left, or
    whose task ended, is hung up first (then killed after HANGUP_S)."""
    hung_up_at: float | None = None
    while True:
        host.step(0.5 if hung_up_at is None else 0.05)
        pid, wait_status = os.waitpid(child, os.WNOHANG)
        if pid == child:
            return os.waitstatus_to_exitcode(wait_status)
        if not new:
            continue
        if hung_up_at is None and (host.task_ended or not host.clients):
            hung_up_at = time.monotonic()
            for sig in (signal.SIGHUP, signal.SIGCONT, signal.SIGTERM):
                _signal_session(child, host.master, sig)
        elif hung_up_at is not None and time.monotonic() - hung_up_at > HANGUP_S:
            _signal_session(child, host.master, signal.SIGKILL)


def main(argv: list[str]) -> int:
    new = argv[1] == "--new"
    watch = int(argv[2]) if new else None
    if new:
        argv = argv[2:]
    directory, attach_wait_s, command = argv[1], float(argv[2]), argv[3:]
    listener = _listen(directory)
    master, slave = _open_terminal()
    wakeup_r, wakeup_w = os.pipe()
    os.set_blocking(wakeup_r, False)
    os.set_blocking(wakeup_w, False)
    host = Host(master, listener, wakeup_r, watch)
    child: int | None = None

    def forward(signum: int, _frame: object) -> None:
        if child is None:  # stopped before anybody attached: nothing has run
            sys.exit(128 + signum)
        _signal_session(child, master, signal.Signals(signum))

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)  # meant for the command, which gets them directly
    signal.set_wakeup_fd(wakeup_w)
    signal.signal(signal.SIGCHLD, lambda _s, _f: None)
    # The command starts once the first client has said its window size (so that nothing it
    # prints is missed and it draws for the right size), or unattended after attach_wait_s;
    # a new shell never runs unattended, nor once its task has ended.
    deadline = time.monotonic() + attach_wait_s
    while not host.heard and not host.task_ended and time.monotonic() < deadline:
        host.step(0.1)
    if new and (not host.heard or host.task_ended):
        host.finish(1)  # a client that came as the task ended: no shell, status 1
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(directory, SOCKET_NAME))
        return 1
    child = _spawn(command, master, slave)
    status = _wait_command(host, child, new=new)
    code = 128 - status if status < 0 else status
    host.finish(code)
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(directory, SOCKET_NAME))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
