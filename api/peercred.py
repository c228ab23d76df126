"""Who owns the other end of a TCP connection on this machine: the uid of the peer's socket, as
the kernel's socket diagnostics answer it (netlink `sock_diag`, what `ss -e` reads; identd's
question, asked of the kernel rather than of /proc/net/tcp).

A loopback peer lives in the server's own network namespace, so the kernel finds its socket by
the connection's two ends, with the uid of whoever opened it. A task that shares the host's
network (one without a private namespace) reaches the server's loopback too, but its sockets
carry its org's uid: the server tells its own machine's services (its uid, root) from the
tasks on it. The lookup is exact (one socket by its four-tuple, no listing of the table to
race with connections that come and go).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from dataclasses import dataclass

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLMSG_ERROR = 0x2
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
TCP_LISTEN = 10
ALL_STATES = 0xFFFFFFFF
REPLY_TIMEOUT_S = 1.0

_NLMSGHDR = struct.Struct("=IHHII")
_REQ_HEAD = struct.Struct("=BBBBI")  # family, protocol, extensions, pad, states
_SOCKID = struct.Struct("!HH16s16s")  # sport, dport (big-endian), src, dst (network order)
_SOCKID_TAIL = struct.Struct("=III")  # interface, cookie[2]
_MSG_HEAD = struct.Struct("=BBBB")  # family, state, timer, retransmits
_MSG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: Address
    port: int

    @classmethod
    def of(cls, host: str, port: int) -> Endpoint | None:
        """An endpoint from a connection's (host, port); None when the host is no address."""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack socket's IPv4 peer
        return cls(address, port)


class LookupUnavailable(Exception):
    """The kernel cannot be asked (not Linux, or sock_diag refused)."""


def socket_uid(local: Endpoint, remote: Endpoint) -> int | None:
    """The uid of the TCP socket on this machine whose own end is `local` and whose other end
    is `remote`; None when there is none. LookupUnavailable when the kernel cannot tell."""
    if type(local.address) is not type(remote.address):
        return None
    family = socket.AF_INET if local.address.version == 4 else socket.AF_INET6
    request = _request(family, local, remote)
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(REPLY_TIMEOUT_S)
            nl.sendto(request, (0, 0))
            reply = nl.recv(8192)
    except (AttributeError, OSError) as exc:  # AF_NETLINK is Linux's
        raise LookupUnavailable(str(exc)) from exc
    return _uid_of(reply, local, remote)


def _request(family: int, local: Endpoint, remote: Endpoint) -> bytes:
    body = (
        _REQ_HEAD.pack(family, socket.IPPROTO_TCP, 0, 0, ALL_STATES)
        + _SOCKID.pack(local.port, remote.port, _packed(local.address), _packed(remote.address))
        + _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    )
    return (
        _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + body
    )


def _uid_of(reply: bytes, local: Endpoint, remote: Endpoint) -> int | None:
    """The uid in the kernel's answer, if it names exactly that connection. The kernel's
    lookup of one socket falls back to a listener on the local end: that is not the peer."""
    if len(reply) < _NLMSGHDR.size:
        raise LookupUnavailable("short netlink reply")
    _, kind, _, _, _ = _NLMSGHDR.unpack_from(reply)
    offset = _NLMSGHDR.size
    if kind == NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", reply, offset)
        if -code == errno.ENOENT:
            return None
        raise LookupUnavailable(f"sock_diag: {errno.errorcode.get(-code, -code)}")
    if kind != SOCK_DIAG_BY_FAMILY or len(reply) < offset + 72:
        raise LookupUnavailable(f"unexpected netlink reply type {kind}")
    family, state, _, _ = _MSG_HEAD.unpack_from(reply, offset)
    sport, dport, src, dst = _SOCKID.unpack_from(reply, offset + _MSG_HEAD.size)
    found_local = Endpoint(_unpacked(src, family), sport)
    found_remote = Endpoint(_unpacked(dst, family), dport)
    if state == TCP_LISTEN or found_local != local or found_remote != remote:
        return None
    tail = offset + _MSG_HEAD.size + _SOCKID.size + _SOCKID_TAIL.size
    _, _, _, uid, _ = _MSG_TAIL.unpack_from(reply, tail)
    return int(uid)


def _packed(address: Address) -> bytes:
    return address.packed.ljust(16, b"\0")


def _unpacked(raw: bytes, family: int) -> Address:
    """An address of the reply: an IPv6 socket's IPv4 connection shows `::ffff:a.b.c.d`."""
    if family == socket.AF_INET:
        return ipaddress.IPv4Address(raw[:4])
    address = ipaddress.IPv6Address(raw)
    return address.ipv4_mapped or address
