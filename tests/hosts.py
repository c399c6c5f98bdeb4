"""Hosts on this machine, for tests of what crosses a network: each host is a network namespace
on a private bridge, with its own sshd, its own process namespace (so that `ray stop` on one host
stops only that host's Ray), and its own mount namespace in which /root (the home of the one ssh
user, root) and /tmp are private folders. The root namespace's end of the bridge
plays the user's laptop. Addresses live only on the bridge and in the namespaces, and the
namespaces have no default route, so nothing reaches or leaves the machine's own network.

Needs root on Linux, iproute2, util-linux (unshare, nsenter), and Debian's openssh-server and
rsync (installed with apt-get when missing). Usable by hand:

    sudo python tests/hosts.py up 3      # prints the addresses and the ssh key
    sudo python tests/hosts.py down      # removes every host, the bridge and their folders
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

# One set of hosts is named by a prefix: bridge dbp-br, namespaces dbp-h1.., root-side veths
# dbp-v1.., folders under /var/tmp/distbp-hosts-dbp (not /tmp: each host mounts its own /tmp).
# Two sets with different prefixes and subnets can exist side by side.
PREFIX, SUBNET = "dbp", "10.213.7"  # laptop .1, host i at .10+i
PRIVATE = ("/root", "/tmp")  # each host has its own
SSHD = "/usr/sbin/sshd"


def _run(*cmd, check=True, timeout=60, **kw):
    return subprocess.run(cmd, check=check, timeout=timeout, capture_output=True, text=True, **kw)


def unavailable():
    """Why the hosts cannot be made here, or None when they can."""
    if sys.platform != "linux":
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root (network and mount namespaces, a bridge, sshd)"
    for tool in ("ip", "tc", "unshare", "nsenter", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    probe = f"dbp-probe-{os.getpid()}"  # the suite's processes each import this at once
    try:
        _run("ip", "netns", "add", probe)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        return f"cannot make a network namespace: {getattr(err, 'stderr', '') or err}".strip()
    _run("ip", "netns", "del", probe, check=False)
    return None


def ensure_packages():
    """openssh-server and rsync, which the Ray cluster launcher needs on every host."""
    if os.path.exists(SSHD) and shutil.which("rsync") and shutil.which("ssh"):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    wait = ["-o", "DPkg::Lock::Timeout=300"]  # another apt (a machine's start-up) may hold the lock
    install = ["apt-get", *wait, "install", "-y", "-q", "openssh-server", "openssh-client", "rsync"]
    if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode != 0:
        _run("apt-get", *wait, "update", "-q", env=env, timeout=600)
        _run(*install, env=env, timeout=600)


class Host:
    """One host: its namespace, address, folders and sshd."""

    def __init__(self, index, base, prefix, subnet):
        self.index = index
        self.name = f"{prefix}-h{index}"
        self.veth = f"{prefix}-v{index}"  # the root namespace's end; the host's end is eth0
        self.ip = f"{subnet}.{10 + index}"
        self.dir = base / f"h{index}"
        self.home, self.tmp = self.dir / "home", self.dir / "tmp"
        self.sshd = None

    def init_pid(self):
        """The host's first process (its PID 1), as this machine numbers it."""
        return int(Path(f"/proc/{self.sshd.pid}/task/{self.sshd.pid}/children").read_text().split()[0])

    def run(self, command, timeout=60, check=True):
        """`command` (a shell line) inside this host: its network, mount and process namespaces."""
        pid = self.init_pid()
        return _run("nsenter", "-t", str(pid), "-n", "-m", "-p", "--", "sh", "-c", command, timeout=timeout, check=check)

    def pids(self):
        """Every process in this host's network namespace."""
        out = _run("ip", "netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split()]

    def link(self, up):
        """Plug or unplug the host's cable (the bridge side of its veth)."""
        _run("ip", "link", "set", self.veth, "up" if up else "down")

    def shape(self, rate):
        """Limit the link to `rate` (tc syntax, e.g. '100mbit') in both directions with a token
        bucket (tbf shapes what leaves an interface, so both ends get one); None removes it."""
        for prefix, dev in ((["ip", "netns", "exec", self.name], "eth0"), ([], self.veth)):
            if rate is None:
                _run(*prefix, "tc", "qdisc", "del", "dev", dev, "root", check=False)
            else:
                burst = max(32 * 1024, _bits(rate) // 8 // 250)  # a 4 ms bucket, at least 32 KiB
                _run(*prefix, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", str(burst), "latency", "400ms")

    def shaped_packets(self):
        """Packets the token buckets on this host's link held back (overlimits), both ends."""
        total = 0
        for prefix, dev in ((["ip", "netns", "exec", self.name], "eth0"), ([], self.veth)):
            out = _run(*prefix, "tc", "-s", "qdisc", "show", "dev", dev).stdout.split()
            total += int(out[out.index("overlimits") + 1]) if "overlimits" in out else 0
        return total


def _bits(rate):
    units = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "bit": 1}
    for unit, scale in units.items():
        if rate.endswith(unit):
            return int(float(rate[: -len(unit)]) * scale)
    raise ValueError(f"rate {rate!r}: expected e.g. 100mbit or 1gbit")


class Hosts:
    """`n` hosts on a private bridge. Use as a context manager, or up() and down()."""

    def __init__(self, n, prefix=PREFIX, subnet=SUBNET, shared=()):
        self.prefix, self.laptop_ip = prefix, f"{subnet}.1"
        self.base = base_dir(prefix)
        self.hosts = [Host(i, self.base, prefix, subnet) for i in range(1, n + 1)]
        # Folders under /root or /tmp that stay visible, at the same path, inside every host's
        # private home and /tmp: this Python's installation (a pyenv under /root, a venv in a
        # checkout under /tmp, say), plus `shared`.
        here = [Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), *map(Path, shared)]
        self.shared = sorted({p for p in here if any(Path(private) in p.parents for private in PRIVATE)})
        self.key = self.base / "id_ed25519"  # the laptop's key, authorised on every host

    def __enter__(self):
        return self.up()

    def __exit__(self, *exc):
        self.down()

    @property
    def ips(self):
        return [h.ip for h in self.hosts]

    def up(self):
        down(self.prefix)  # what an earlier, killed session left
        ensure_packages()
        self.base.mkdir(parents=True)
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key))
        bridge = f"{self.prefix}-br"
        _run("ip", "link", "add", bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.laptop_ip}/24", "dev", bridge)
        _run("ip", "link", "set", bridge, "up")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder
        try:
            for host in self.hosts:
                self._make(host)
            for host in self.hosts:
                self._wait_for_ssh(host)
        except BaseException:
            self.down()
            raise
        return self

    def _make(self, host):
        for d in (host.home / ".ssh", host.tmp, host.dir / "etc"):
            d.mkdir(parents=True)
        host.tmp.chmod(0o1777)
        shutil.copy(f"{self.key}.pub", host.home / ".ssh" / "authorized_keys")
        (host.home / ".bashrc").write_text("# a fresh machine's\n")
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host.dir / "etc" / "host_key"))
        config = host.dir / "etc" / "sshd_config"
        config.write_text(
            f"ListenAddress {host.ip}\nPort 22\nHostKey {host.dir}/etc/host_key\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nUseDNS no\nPrintMotd no\nPidFile none\nMaxStartups 100:30:200\n"
            "MaxSessions 100\nSubsystem sftp internal-sftp\n"
        )
        _run("ip", "netns", "add", host.name)
        _run("ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.name)
        _run("ip", "link", "set", host.veth, "master", f"{self.prefix}-br")
        _run("ip", "link", "set", host.veth, "up")
        for cmd in (["addr", "add", f"{host.ip}/24", "dev", "eth0"], ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"]):
            _run("ip", "netns", "exec", host.name, "ip", *cmd)
        # The shared folders are bound into the private home first, then /root and /tmp are
        # bound over (recursively, to carry those), while the sources are the machine's own paths.
        binds, own = [], {"/root": host.home, "/tmp": host.tmp}
        for path in self.shared:
            private = next(p for p in PRIVATE if Path(p) in path.parents)
            inside = own[private] / path.relative_to(private)
            inside.mkdir(parents=True, exist_ok=True)
            binds.append(f"mount --bind {path} {inside}")
        binds += [f"mount --rbind {host.home} /root", f"mount --rbind {host.tmp} /tmp", f"exec {SSHD} -D -e -f {config}"]
        mounts = " && ".join(binds)
        log = open(host.dir / "sshd.log", "wb")
        host.sshd = subprocess.Popen(
            ["ip", "netns", "exec", host.name, "unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc", "--", "sh", "-c", mounts],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
        )

    def _wait_for_ssh(self, host, timeout_s=30):
        deadline = time.monotonic() + timeout_s
        while True:
            if self.ssh(host, "true", check=False, timeout=10).returncode == 0:
                return
            if host.sshd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd on {host.name} did not start: {(host.dir / 'sshd.log').read_text()[-2000:]}")
            time.sleep(0.2)

    def ssh_options(self):
        return ["-i", str(self.key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]

    def ssh(self, host, command, check=True, timeout=120):
        """`command` on `host` over SSH from the laptop, as the launcher runs it."""
        return _run("ssh", *self.ssh_options(), f"root@{host.ip}", command, check=check, timeout=timeout)

    def down(self):
        down(self.prefix)


def base_dir(prefix):
    return Path(f"/var/tmp/distbp-hosts-{prefix}")


def down(prefix=PREFIX):
    """Remove every host of the set `prefix`: their processes, namespaces, veths, the bridge
    and their folders. Safe to call when nothing is there."""
    names = _run("ip", "netns", "list", check=False).stdout.split()
    for name in [n for n in names if n.startswith(f"{prefix}-h")]:
        for _ in range(50):  # bounded: processes that ignore SIGKILL do not exist, but be sure
            pids = [int(p) for p in _run("ip", "netns", "pids", name, check=False).stdout.split()]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        _run("ip", "netns", "del", name, check=False)
    links = _run("ip", "-o", "link", "show", check=False).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(f"{prefix}-"):
            _run("ip", "link", "del", name, check=False)
    shutil.rmtree(base_dir(prefix), ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "down":
        down()
    elif len(sys.argv) == 3 and sys.argv[1] == "up":
        why = unavailable()
        if why:
            sys.exit(f"hosts: {why}")
        hosts = Hosts(int(sys.argv[2])).up()
        print(f"laptop {hosts.laptop_ip}; hosts " + " ".join(hosts.ips) + f"; ssh -i {hosts.key} root@<host>")
        print("the sshd processes run on; remove everything with: python tests/hosts.py down")
    else:
        sys.exit("usage: python tests/hosts.py up N | down")
