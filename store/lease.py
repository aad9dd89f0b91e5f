"""Writer leases: which process owns a slide that is being written, and whether it is still alive.

Object storage has no atomic create-if-absent, so ownership is a lease in the slide's in-progress marker:
a random token, where the writer runs (host, pid, the pid's start time) and a heartbeat the writer renews.
Another writer may take a slide over only when the lease is dead: its heartbeat is older than the lease
length, or its process is gone (same host: checked directly, so a rerun after a crash or Ctrl-C need not
wait for the lease to run out).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Mapping

DEFAULT_LEASE_SECONDS = 600.0  # a writer silent this long is presumed dead
HEARTBEAT_FRACTION = 0.1  # renew after a tenth of the lease


def _pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the writer."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return started is None or _pid_start(pid) in (None, started)


@dataclass(frozen=True)
class Lease:
    token: str
    host: str
    pid: int
    pid_start: str | None
    heartbeat_at: float  # epoch seconds (compared across machines: the lease length absorbs clock skew)
    lease_seconds: float

    @classmethod
    def new(cls, lease_seconds: float = DEFAULT_LEASE_SECONDS, token: str | None = None) -> Lease:
        """A lease for this process; `token` when the caller names it (a coordinator that hands slides to
        writer processes, and so knows which leases are its own when one of those processes dies)."""
        pid = os.getpid()
        return cls(token or uuid.uuid4().hex, socket.gethostname(), pid, _pid_start(pid), time.time(),
                   float(lease_seconds))

    @classmethod
    def from_attrs(cls, value: Any) -> Lease | None:
        if not isinstance(value, Mapping) or "token" not in value:
            return None
        return cls(str(value["token"]), str(value.get("host", "")), int(value.get("pid", -1)), value.get("pid_start"),
                   float(value.get("heartbeat_at", 0.0)), float(value.get("lease_seconds", DEFAULT_LEASE_SECONDS)))

    def to_attrs(self) -> dict[str, Any]:
        return asdict(self)

    def renewed(self) -> Lease:
        return Lease(self.token, self.host, self.pid, self.pid_start, time.time(), self.lease_seconds)

    def due_for_renewal(self) -> bool:
        return time.time() - self.heartbeat_at >= self.lease_seconds * HEARTBEAT_FRACTION

    def alive(self) -> bool:
        """False when the heartbeat has expired, or the writer's process on this host is gone."""
        if time.time() - self.heartbeat_at > self.lease_seconds:
            return False
        if self.host == socket.gethostname() and self.pid > 0:
            return _pid_alive(self.pid, self.pid_start)
        return True

    def describe(self) -> str:
        age = max(0.0, time.time() - self.heartbeat_at)
        return f"pid {self.pid} on {self.host}, last heartbeat {age:.0f} s ago (lease {self.lease_seconds:.0f} s)"
