"""Network namespaces joined to this one by veth pairs, so that processes in them are separate hosts on the network
(as root, with iproute2's `ip`). Each namespace gets a /30 of 10.213.0.0/16: x.x.n.1 on this side, x.x.n.2 inside.
Only the namespaces, links and addresses made here are touched, and all are removed afterwards.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

NETWORK = ipaddress.ip_network("10.213.0.0/16")


@dataclass(frozen=True)
class Namespace:
    name: str  # for `ip netns exec`
    link: str  # the veth end on this side
    host_address: str  # this side's address: how the namespace reaches us
    address: str  # the namespace's own address: how we reach it

    def rx_bytes(self) -> int:
        """Bytes this side received from the namespace so far."""
        return int(Path(f"/sys/class/net/{self.link}/statistics/rx_bytes").read_text())


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def cannot_make_namespaces() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    overlap = subprocess.run(["ip", "-4", "route", "show", "to", "match", "10.213.0.1"], capture_output=True, text=True)
    if "10.213." in overlap.stdout:
        return f"10.213.0.0/16 is already routed here ({overlap.stdout.strip()}); not touching it"
    probe = f"tkdprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"cannot create a network namespace: {exc.stderr.strip() or exc}"
    _ip("netns", "del", probe)
    return None


@contextlib.contextmanager
def namespaces(roles: Sequence[str]) -> Iterator[dict[str, Namespace]]:
    """One namespace per role, each on its own veth pair and /30."""
    made: dict[str, Namespace] = {}
    tag = os.getpid() % 10000
    first_subnet = (os.getpid() % 200) * len(roles)  # apart from a concurrent run's
    try:
        for i, role in enumerate(roles):
            subnet = ipaddress.ip_network((int(NETWORK.network_address) + 4 * ((first_subnet + i) % 16384), 30))
            host, inside = (str(a) for a in list(subnet.hosts())[:2])
            space = Namespace(f"tkd{tag}-{role}", f"tkd{tag}v{i}", host, inside)
            peer = f"tkd{tag}p{i}"
            _ip("netns", "add", space.name)
            made[role] = space
            _ip("link", "add", space.link, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", space.name)
            _ip("addr", "add", f"{host}/30", "dev", space.link)
            _ip("link", "set", space.link, "up")
            _ip("-n", space.name, "addr", "add", f"{inside}/30", "dev", peer)
            _ip("-n", space.name, "link", "set", peer, "up")
            _ip("-n", space.name, "link", "set", "lo", "up")
        yield made
    finally:
        for space in made.values():
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", space.name)  # takes its veth end, and so the pair, with it
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("link", "del", space.link)  # already gone unless the namespace went first
