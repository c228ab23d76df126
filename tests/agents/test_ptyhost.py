"""The terminal host (agents/ptyhost.py) as the runner starts it, spoken to over its socket as
the agent's streams do: the command waits for the first frame, its output and exit status come
back in frames, and the number of clients is bounded."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from agents import ptyhost


def _connect(directory: Path) -> socket.socket:
    """As the agent's streams connect: through the directory's fd (a unix socket's path is
    limited to 108 bytes), while the host is not listening yet."""
    deadline = time.monotonic() + 10
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
        try:
            sock.connect(f"/proc/self/fd/{dir_fd}/{ptyhost.SOCKET_NAME}")
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            assert time.monotonic() < deadline, "the host did not listen"
        except BaseException:
            sock.close()
            raise
        else:
            sock.settimeout(10)
            return sock
        finally:
            os.close(dir_fd)
        time.sleep(0.02)


def _frames(sock: socket.socket) -> list[tuple[bytes, bytes]]:
    """Every frame until the host closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    frames = []
    while data:
        kind, length = ptyhost.HEADER.unpack_from(data)
        frames.append((kind, data[ptyhost.HEADER.size : ptyhost.HEADER.size + length]))
        data = data[ptyhost.HEADER.size + length :]
    return frames


def test_a_terminal_session_over_the_hosts_socket(tmp_path: Path) -> None:
    script = "stty size; read line; echo got:$line; exit 4"
    host = subprocess.Popen(
        [sys.executable, "-I", "-S", ptyhost.__file__, str(tmp_path), "30", "sh", "-c", script],
        stdout=subprocess.PIPE,
    )
    try:
        first = _connect(tmp_path)
        assert oct(os.stat(tmp_path / ptyhost.SOCKET_NAME).st_mode & 0o777) == "0o600"
        others = [_connect(tmp_path) for _ in range(ptyhost.MAX_CLIENTS - 1)]
        refused = _connect(tmp_path)
        assert _frames(refused) == [
            (ptyhost.FRAME_REFUSED, b"the terminal has 8 clients attached already")
        ]
        refused.close()
        # The command starts on the first frame: the window's size.
        first.sendall(ptyhost.frame(ptyhost.FRAME_RESIZE, struct.pack(">HH", 33, 101)))
        first.sendall(ptyhost.frame(ptyhost.FRAME_DATA, b"hello\r"))
        frames = _frames(first)
        output = b"".join(p for k, p in frames if k == ptyhost.FRAME_DATA).replace(b"\r", b"")
        assert b"33 101\n" in output
        assert b"got:hello\n" in output
        assert frames[-1] == (ptyhost.FRAME_EXIT, b"4")
        for other in others:  # every client sees the same session end
            assert _frames(other)[-1] == (ptyhost.FRAME_EXIT, b"4")
            other.close()
        first.close()
        stdout, _ = host.communicate(timeout=10)
        assert host.returncode == 4
        assert b"got:hello" in stdout  # the session is the task's log too
        assert not (tmp_path / ptyhost.SOCKET_NAME).exists()
    finally:
        host.kill()
        host.wait()
        assert host.stdout is not None
        host.stdout.close()


def test_a_terminal_whose_directory_is_past_the_unix_path_limit(tmp_path: Path) -> None:
    # A task's directory may be deep: the host listens, and the agent connects, through the
    # directory's fd, whatever the length of its path.
    directory = tmp_path / ("d" * 120)
    directory.mkdir()
    assert len(str(directory / ptyhost.SOCKET_NAME)) > 108
    host = subprocess.Popen(
        [sys.executable, "-I", "-S", ptyhost.__file__, str(directory), "30", "sh", "-c", "exit 6"],
        stdout=subprocess.PIPE,
    )
    try:
        client = _connect(directory)
        client.sendall(ptyhost.frame(ptyhost.FRAME_RESIZE, struct.pack(">HH", 24, 80)))
        frames = _frames(client)
        client.close()
        assert frames[-1:] == [(ptyhost.FRAME_EXIT, b"6")], frames
        host.communicate(timeout=10)
        assert host.returncode == 6
    finally:
        host.kill()
        host.wait()
        assert host.stdout is not None
        host.stdout.close()


def test_a_stop_that_comes_as_the_command_ends_still_gets_its_exit_status(tmp_path: Path) -> None:
    # The runner's SIGTERM reaches the host (through its wrapper's group) just after the
    # command has ended on its own: the terminal has no foreground group any more, and the host
    # must neither signal its own group (tcgetpgrp gives 0 then; killpg(0) is the caller's
    # group) nor lose the exit status.
    script = "echo ready; sleep 0.3; exit 3"
    host = subprocess.Popen(
        [sys.executable, "-I", "-S", ptyhost.__file__, str(tmp_path), "30", "sh", "-c", script],
        stdout=subprocess.PIPE,
        start_new_session=True,  # as under its wrapper: a group of its own
    )
    try:
        client = _connect(tmp_path)
        client.sendall(ptyhost.frame(ptyhost.FRAME_RESIZE, struct.pack(">HH", 24, 80)))
        seen = b""
        while b"ready" not in seen:
            seen += client.recv(65536)
        host.send_signal(signal.SIGSTOP)  # the command ends while the host cannot notice
        time.sleep(1.0)  # no event to await: the host is stopped, the command's end unseen
        host.send_signal(signal.SIGTERM)
        host.send_signal(signal.SIGCONT)
        frames = _frames(client)
        client.close()
        assert frames[-1:] == [(ptyhost.FRAME_EXIT, b"3")], frames
        host.communicate(timeout=10)
        assert host.returncode == 3
    finally:
        host.kill()
        host.wait()
        assert host.stdout is not None
        host.stdout.close()
