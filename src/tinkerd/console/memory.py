"""Memory figures for the server page: this process's resident memory now and at its peak (from /proc, or the
peak from getrusage where /proc is missing), and the machine's total and available memory."""

from __future__ import annotations

import os


def _read_kb(path: str, keys: dict[str, str]) -> dict[str, int]:
    found: dict[str, int] = {}
    try:
        with open(path, encoding="ascii") as lines:
            for line in lines:
                parts = line.split()
                if parts and parts[0] in keys:
                    found[keys[parts[0]]] = int(parts[1]) * 1024  # the files count in kB
    except OSError:
        pass
    return found


def process_memory() -> dict[str, int | None]:
    """``rss_bytes`` and ``peak_rss_bytes`` of this process (None when unknown), and its ``pid``."""
    found = _read_kb("/proc/self/status", {"VmRSS:": "rss_bytes", "VmHWM:": "peak_rss_bytes"})
    if "peak_rss_bytes" not in found:
        import resource

        found["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return {"rss_bytes": found.get("rss_bytes"), "peak_rss_bytes": found.get("peak_rss_bytes"), "pid": os.getpid()}


def machine_memory() -> dict[str, int | None]:
    """``total_bytes`` and ``available_bytes`` of this machine (None when unknown)."""
    found = _read_kb("/proc/meminfo", {"MemTotal:": "total_bytes", "MemAvailable:": "available_bytes"})
    return {"total_bytes": found.get("total_bytes"), "available_bytes": found.get("available_bytes")}
