"""Memory figures of this process and host from /proc (Linux)."""
from __future__ import annotations

from typing import Optional


def proc_kb(path: str, key: str) -> Optional[int]:
    """The ``kB`` field ``key`` of a /proc file (e.g. ``VmRSS`` of
    ``/proc/self/status``, ``MemAvailable`` of ``/proc/meminfo``), or None
    where it is missing (another OS)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ':'):
                    return int(line.split()[1])
    except OSError:
        pass
    return None
