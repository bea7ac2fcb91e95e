"""Network namespaces for the nemesis: one hub namespace holding a bridge, one
namespace per component (etcd, the S3 server, each broker), each joined to
the hub by a veth pair, and the root namespace (where the harness's clients
run) joined to the hub by one more veth. Addresses are in 10.77.N.0/24 with
N picked per run so that two runs on one machine do not collide.

Faults are routes and qdiscs inside the namespaces this module created:
`ip route add blackhole ADDR/32` in a broker's namespace cuts it off from
ADDR (packets dropped, connections hang, as in a real partition), `tc qdisc
add dev VETH root netem delay ...` in a component's namespace slows all it
sends. Everything is removed by heal_all() and the namespaces (with their
veths) by delete().
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess

ROOT_HOST = 1  # the harness's address: 10.77.N.1


class NetnsError(RuntimeError):
    pass


def _run(args, check=True, timeout=30):
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise NetnsError("%s failed (rc %d): %s" % (" ".join(args), out.returncode,
                                                  (out.stderr or out.stdout).strip()))
    return out


def available():
    """Why namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    return None


def _pick_subnet():
    """A 10.77.N.0/24 that no route of the root namespace touches yet."""
    routes = _run(["ip", "-4", "route", "show", "table", "all"], check=False).stdout
    used = {line.split()[0] for line in routes.splitlines() if line.strip()}
    rng = random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "little"))
    for _ in range(400):
        n = rng.randrange(10, 250)
        if not any(u.startswith("10.77.%d." % n) for u in used):
            return n
    raise NetnsError("no free 10.77.N.0/24 subnet")


class Network:
    """Hub + per-component namespaces. `hosts` maps a component name to its
    host number in the subnet (10.77.N.<host>)."""

    def __init__(self, hosts: dict[str, int], log=print):
        self.log = log
        self.n = _pick_subnet()
        self.tag = "nm%d" % self.n  # short: interface names are at most 15 bytes
        self.hub = "%s-hub" % self.tag
        self.hosts = dict(hosts)
        self.ns = {c: "%s-%s" % (self.tag, c) for c in hosts}
        self.dev = {}  # component -> its veth end inside its own namespace
        self.root_dev = "%sr" % self.tag
        self.created_ns: list[str] = []
        self.root_link = False
        self.routes: set[tuple[str, str]] = set()  # (component, blackholed address)
        self.qdiscs: set[str] = set()  # components with a netem qdisc
        self.deleted = False

    def addr(self, component: str) -> str:
        if component == "root":
            return "10.77.%d.%d" % (self.n, ROOT_HOST)
        return "10.77.%d.%d" % (self.n, self.hosts[component])

    # ---------------------------------------------------------------- setup
    def create(self):
        _run(["ip", "netns", "add", self.hub])
        self.created_ns.append(self.hub)
        _run(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.hub, "link", "set", "br0", "up"])
        _run(["ip", "-n", self.hub, "link", "set", "lo", "up"])
        for i, c in enumerate(self.hosts):
            ns = self.ns[c]
            _run(["ip", "netns", "add", ns])
            self.created_ns.append(ns)
            a, b = "%sh%d" % (self.tag, i), "%sc%d" % (self.tag, i)
            _run(["ip", "link", "add", a, "type", "veth", "peer", "name", b])
            _run(["ip", "link", "set", a, "netns", self.hub])
            _run(["ip", "link", "set", b, "netns", ns])
            _run(["ip", "-n", self.hub, "link", "set", a, "master", "br0", "up"])
            _run(["ip", "-n", ns, "addr", "add", self.addr(c) + "/24", "dev", b])
            _run(["ip", "-n", ns, "link", "set", b, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            self.dev[c] = b
        a, b = self.root_dev, "%shr" % self.tag
        _run(["ip", "link", "add", a, "type", "veth", "peer", "name", b])
        self.root_link = True
        _run(["ip", "link", "set", b, "netns", self.hub])
        _run(["ip", "-n", self.hub, "link", "set", b, "master", "br0", "up"])
        _run(["ip", "addr", "add", self.addr("root") + "/24", "dev", a])
        _run(["ip", "link", "set", a, "up"])
        self.log("network: subnet 10.77.%d.0/24, namespaces %s" % (self.n, " ".join(self.created_ns)))

    def exec_prefix(self, component: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[component]]

    # --------------------------------------------------------------- faults
    def blackhole(self, component: str, target: str):
        """In `component`'s namespace, drop everything sent to `target`
        (a component name or "root" for the harness's clients)."""
        address = self.addr(target)
        _run(["ip", "-n", self.ns[component], "route", "add", "blackhole", address + "/32"])
        self.routes.add((component, address))

    def unblackhole(self, component: str, target: str):
        address = self.addr(target)
        _run(["ip", "-n", self.ns[component], "route", "del", "blackhole", address + "/32"], check=False)
        self.routes.discard((component, address))

    def delay(self, component: str, ms: int, jitter_ms: int = 0):
        """Delay everything `component` sends by `ms` (netem on its veth)."""
        args = ["ip", "netns", "exec", self.ns[component], "tc", "qdisc", "add", "dev",
                self.dev[component], "root", "netem", "delay", "%dms" % ms]
        if jitter_ms:
            args.append("%dms" % jitter_ms)
        _run(args)
        self.qdiscs.add(component)

    def undelay(self, component: str):
        _run(["ip", "netns", "exec", self.ns[component], "tc", "qdisc", "del", "dev",
              self.dev[component], "root"], check=False)
        self.qdiscs.discard(component)

    def heal_all(self):
        for component, address in sorted(self.routes):
            _run(["ip", "-n", self.ns[component], "route", "del", "blackhole", address + "/32"], check=False)
        self.routes.clear()
        for component in sorted(self.qdiscs):
            self.undelay(component)

    # -------------------------------------------------------------- cleanup
    def delete(self):
        """Deletes every namespace this object created (their veths go with
        them) and the root end of the harness's veth. Idempotent."""
        if self.deleted:
            return
        self.deleted = True
        for ns in reversed(self.created_ns):
            _run(["ip", "netns", "del", ns], check=False)
        if self.root_link:
            # Normally gone with its peer in the hub; make sure.
            if _run(["ip", "link", "show", self.root_dev], check=False).returncode == 0:
                _run(["ip", "link", "del", self.root_dev], check=False)
