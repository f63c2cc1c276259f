"""Which clients are still connected: the server ends a departed client's requests (docs/protocol.md, "Clients
that go away").

libzmq's ROUTER does not tell its user that a peer left (ZMQ_ROUTER_NOTIFY and the versioned socket monitor
are draft APIs, absent from release builds), so three released features are combined:
- the socket monitor reports each connection's DISCONNECTED event with its file descriptor;
- every frame says which descriptor it was read from (ZMQ_SRCFD), so the server learns, when it accepts a
  request, on which connection (descriptor + the socket's inode, unique among open sockets) its routing
  identity lives;
- ZMTP heartbeats (ZMQ_HEARTBEAT_IVL / ZMQ_HEARTBEAT_TIMEOUT, set by the server) make libzmq close a
  connection whose peer stops answering (a stopped process, a host that vanished without a FIN), which
  then produces the DISCONNECTED event.
libzmq reports the event just before it closes the descriptor, and a descriptor may be reused by a new
connection before the server reads an old event. So an event only makes the identities on that descriptor
suspects: a suspect is departed once its descriptor is closed or holds another socket (another inode);
one whose socket is still open after `SUSPECT_GRACE_S` was not the one that left. Only identities with
requests in flight are watched. Connections over inproc:// have no descriptor and are not watched.
"""

from __future__ import annotations

import os
import stat

import zmq
from zmq.utils.monitor import recv_monitor_message

__all__ = ["Peers", "SUSPECT_GRACE_S"]

SUSPECT_GRACE_S = 2.0


def _socket_inode(fd: int) -> int | None:
    """The inode of the socket open on `fd`, or None (closed, or not a socket)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_ino if stat.S_ISSOCK(st.st_mode) else None


class Peers:
    """Watches the connections of `sock` (a ROUTER). `watch(identity, frame)` when a request is accepted,
    `forget(identity)` when the identity has nothing in flight, `departed(now)` each loop turn."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self.monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._conn: dict[bytes, tuple[int, int]] = {}  # identity -> (descriptor, socket inode)
        self._suspects: dict[bytes, float] = {}  # identity -> when its descriptor reported a disconnect

    def __len__(self) -> int:
        return len(self._conn)

    def watch(self, identity: bytes, frame: zmq.Frame) -> bool:
        """Start watching `identity` (its request arrived in `frame`). False when its connection is already
        closed: the client left before its request was read."""
        if identity in self._conn:
            return True
        try:
            fd = frame.get(zmq.SRCFD)
        except zmq.ZMQError:  # inproc: no descriptor, nothing to watch
            return True
        if fd is None or fd < 0:
            return True
        inode = _socket_inode(fd)
        if inode is None:
            return False
        self._conn[identity] = (fd, inode)
        return True

    def forget(self, identity: bytes) -> None:
        self._conn.pop(identity, None)
        self._suspects.pop(identity, None)

    def departed(self, now: float) -> list[bytes]:
        """Identities whose connection has closed since the last call (they are forgotten)."""
        fds = set()
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            if event["event"] == zmq.EVENT_DISCONNECTED:
                fds.add(int(event["value"]))
        if fds:
            for identity, (fd, _) in self._conn.items():
                if fd in fds:
                    self._suspects.setdefault(identity, now)
        gone = []
        for identity, since in list(self._suspects.items()):
            fd, inode = self._conn[identity]
            if _socket_inode(fd) != inode:
                gone.append(identity)
                self.forget(identity)
            elif now - since > SUSPECT_GRACE_S:
                del self._suspects[identity]  # still open: the event was another connection's
        return gone

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
