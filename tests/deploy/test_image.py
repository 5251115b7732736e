"""Prove the container image's content without a container engine.

The binary is built with the Dockerfile's own cargo command, the runtime tree is
assembled by the same deploy/image/stage-rootfs.sh the Dockerfile runs, and
nodedns is then started chrooted into that tree, in a private mount namespace
with /proc mounted (as a container has it), as root with every capability but
NET_ADMIN and NET_BIND_SERVICE dropped and no_new_privs set (as the DaemonSet's
securityContext does). It must answer DNS on loopback from a loopback fake
upstream: no query ever leaves the machine.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import threading
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import (
    DEPLOY,
    REPO,
    UPSTREAM_ENV,
    config_of,
    container,
    find,
    require_flag,
    run,
    tool,
)

ALLOWED_LIBS = {"libc.so.6", "libm.so.6", "libgcc_s.so.1", "libpthread.so.0", "libdl.so.2",
                "librt.so.1", "ld-linux-x86-64.so.2"}
LOADER = "/lib64/ld-linux-x86-64.so.2"


# --- the Dockerfile ------------------------------------------------------------

def _dockerfile():
    from dockerfile_parse import DockerfileParser

    return DockerfileParser(path=str(REPO / "Dockerfile"))


def test_dockerfile_stages_and_metadata():
    p = _dockerfile()
    froms = [i["value"] for i in p.structure if i["instruction"] == "FROM"]
    assert re.fullmatch(r"docker\.io/library/rust:\$\{RUST_VERSION\}-\$\{DEBIAN_RELEASE\} AS build", froms[0])
    assert re.fullmatch(r"docker\.io/library/debian:\$\{DEBIAN_RELEASE\}-slim AS rootfs", froms[1])
    assert froms[-1] == "scratch", "the runtime is the staged tree only"
    final = p.structure[max(i for i, x in enumerate(p.structure) if x["instruction"] == "FROM"):]
    instr = {x["instruction"]: x["value"] for x in final}
    assert json.loads(instr["ENTRYPOINT"]) == ["/usr/bin/nodedns"]
    assert instr["USER"] == "65532:65532"
    labels = p.labels
    for key in ("title", "description", "licenses", "version", "revision", "source", "base.name"):
        assert f"org.opencontainers.image.{key}" in labels, key
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    runs = " ".join(x["value"] for x in p.structure if x["instruction"] == "RUN")
    assert "cargo build --release --locked --bin nodedns" in runs
    assert "apt-get install -y --no-install-recommends iptables nftables" in runs
    assert "stage-rootfs /tmp/nodedns /rootfs" in runs
    # Same Debian release in the build and the rootfs stage: one glibc.
    args = {x["value"].split("=")[0]: x["value"].split("=", 1)[1] for x in p.structure
            if x["instruction"] == "ARG" and "=" in x["value"]}
    assert args["DEBIAN_RELEASE"] == "bookworm"
    rust = tomllib.loads((REPO / "Cargo.toml").read_text())["package"].get("rust-version")
    if rust:
        assert tuple(map(int, args["RUST_VERSION"].split("."))) >= tuple(map(int, rust.split(".")[:2]))


def test_dockerignore_admits_what_the_build_reads():
    lines = [x.strip() for x in (REPO / ".dockerignore").read_text().splitlines()
             if x.strip() and not x.startswith("#")]
    assert lines[0] == "*", "allow-list: start by excluding everything"
    for needed in ("!Cargo.toml", "!Cargo.lock", "!src/", "!deploy/image/stage-rootfs.sh"):
        assert needed in lines
    assert "tests/deploy/" in lines and "!target" not in " ".join(lines)


def test_release_profile_is_the_benchmarked_one():
    prof = tomllib.loads((REPO / "Cargo.toml").read_text())["profile"]["release"]
    assert prof.get("lto") in (True, "fat", "thin") and prof.get("codegen-units") == 1


# --- the binary and the runtime tree -------------------------------------------

def test_binary_linkage(nodedns_bin):
    """Statically linked, or dynamically against glibc's core only (listed)."""
    readelf = tool("readelf")
    dyn = run([readelf, "-d", nodedns_bin]).stdout
    needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dyn))
    print(f"nodedns NEEDED: {sorted(needed) or 'none (static)'}")
    assert needed <= ALLOWED_LIBS, f"unexpected libraries: {needed - ALLOWED_LIBS}"
    if needed:
        interp = run([readelf, "-l", nodedns_bin]).stdout
        assert f"[Requesting program interpreter: {LOADER}]" in interp


@pytest.fixture(scope="session")
def rootfs(nodedns_bin, tmp_path_factory) -> Path:
    for t in ("xtables-nft-multi", "xtables-legacy-multi", "nft", "ldd"):
        tool(t)
    root = tmp_path_factory.mktemp("image") / "rootfs"
    res = run(["sh", DEPLOY / "image/stage-rootfs.sh", nodedns_bin, root], timeout=120)
    assert res.returncode == 0, res.stderr
    return root


def test_rootfs_is_minimal(rootfs):
    files = sorted(str(p.relative_to(rootfs)) for p in rootfs.rglob("*") if p.is_file() and not p.is_symlink())
    for shell in ("bin/sh", "bin/bash", "bin/dash", "usr/bin/apt", "usr/bin/dpkg"):
        assert not (rootfs / shell).exists(), f"{shell} must not be in the image"
    size = sum((rootfs / f).stat().st_size for f in files)
    others = size - (rootfs / "usr/bin/nodedns").stat().st_size
    print(f"rootfs: {len(files)} files, {size / 2**20:.1f} MiB ({others / 2**20:.1f} MiB besides nodedns)")
    assert others < 20 * 2**20
    assert (rootfs / "run").is_dir() and (rootfs / "tmp").is_dir()
    assert (rootfs / "etc/passwd").read_text().startswith("root:x:0:0:")


def _chroot_cmd(rootfs: Path, argv: list[str]) -> list[str]:
    if os.geteuid() != 0 or not shutil.which("chroot"):
        pytest.skip("chroot needs root")
    return ["chroot", str(rootfs), *argv]


def test_every_elf_resolves_inside_the_tree(rootfs):
    """The loader inside the tree finds every library of every program and
    iptables module there (a missing one would only show on a node)."""
    elves = ["/usr/bin/nodedns", "/usr/sbin/xtables-nft-multi", "/usr/sbin/xtables-legacy-multi", "/usr/sbin/nft"]
    elves += ["/" + str(p.relative_to(rootfs)) for p in rootfs.glob("usr/lib/*/xtables/*.so")]
    assert len(elves) > 50
    for elf in elves:
        res = run(_chroot_cmd(rootfs, [LOADER, "--list", elf]), timeout=30)
        assert res.returncode == 0 and "not found" not in res.stdout, f"{elf}: {res.stdout}{res.stderr}"


def _unshare_ok(flags: str) -> bool:
    return shutil.which("unshare") is not None and run(["unshare", flags, "true"], timeout=10).returncode == 0


def test_firewall_tools_work_inside_the_tree(rootfs, tmp_path):
    """The rules nodedns installs, added with the image's own iptables (nft and
    legacy) and read back with nft, in a throwaway network namespace."""
    if not _unshare_ok("-nm"):
        pytest.skip("cannot create network and mount namespaces here")
    script = tmp_path / "fw.sh"
    script.write_text(f"""set -e
mount --make-rprivate /
mount -t proc proc {rootfs}/proc
c() {{ chroot {rootfs} "$@"; }}
c /usr/sbin/iptables -w -t raw -I PREROUTING -d 169.254.20.10/32 -p udp --dport 53 -m comment --comment "nodedns: skip conntrack" -j NOTRACK
c /usr/sbin/iptables -w -I INPUT -d 169.254.20.10/32 -p tcp --dport 53 -j ACCEPT
c /usr/sbin/ip6tables -w -t raw -I OUTPUT -s fd00::10/128 -p udp --sport 53 -j NOTRACK
c /usr/sbin/iptables-legacy -w -t raw -I OUTPUT -d 169.254.20.10/32 -p tcp --dport 8080 -j NOTRACK
echo ---nft-save; c /usr/sbin/iptables-save -t raw
echo ---legacy-save; c /usr/sbin/iptables-legacy-save -t raw
echo ---nft; c /usr/sbin/nft list ruleset
c /usr/sbin/nft add table inet nodedns_test
c /usr/sbin/nft add chain inet nodedns_test pre "{{ type filter hook prerouting priority raw; }}"
c /usr/sbin/nft add rule inet nodedns_test pre ip daddr 169.254.20.10 udp dport 53 notrack
echo ---nft2; c /usr/sbin/nft list table inet nodedns_test
""")
    res = run(["unshare", "-n", "-m", "sh", script], timeout=60)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    nft_save = out.split("---nft-save")[1].split("---legacy-save")[0]
    assert '-A PREROUTING -d 169.254.20.10/32 -p udp -m udp --dport 53 -m comment --comment "nodedns: skip conntrack" -j NOTRACK' in nft_save
    assert "-A OUTPUT -d 169.254.20.10/32 -p tcp -m tcp --dport 8080 -j NOTRACK" in out.split("---legacy-save")[1]
    assert "notrack" in out.split("---nft")[2]
    assert "udp dport 53 notrack" in out.split("---nft2")[1]


# --- nodedns from the tree ----------------------------------------------------------

class FakeUpstream:
    """A loopback DNS server (UDP and TCP on one port) that answers every A
    query with 192.0.2.1 (TEST-NET-1), TTL 300, and counts what it was asked."""

    def __init__(self):
        import dns.message
        import dns.rrset

        self.dns = dns
        self.queries: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        outer = self

        def answer(wire: bytes) -> bytes:
            q = dns.message.from_wire(wire)
            r = dns.message.make_response(q)
            qn = q.question[0]
            if qn.rdtype == 1:
                ip = "10.96.0.1" if str(qn.name).endswith(".cluster.local.") else "192.0.2.1"
                r.answer.append(dns.rrset.from_text(qn.name, 300, "IN", "A", ip))
            return r.to_wire()

        class Udp(socketserver.BaseRequestHandler):
            def handle(self):
                data, sock = self.request
                with outer.lock:
                    outer.queries.append(("udp", self._name(data)))
                sock.sendto(answer(data), self.client_address)

            @staticmethod
            def _name(data):
                return str(dns.message.from_wire(data).question[0].name)

        class Tcp(socketserver.StreamRequestHandler):
            def handle(self):
                while True:
                    head = self.rfile.read(2)
                    if len(head) < 2:
                        return
                    data = self.rfile.read(int.from_bytes(head, "big"))
                    with outer.lock:
                        outer.queries.append(("tcp", Udp._name(data)))
                    out = answer(data)
                    self.wfile.write(len(out).to_bytes(2, "big") + out)

        class ThreadingTcp(socketserver.ThreadingMixIn, socketserver.TCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.udp = socketserver.ThreadingUDPServer(("127.0.0.1", 0), Udp)
        self.port = self.udp.server_address[1]
        self.tcp = ThreadingTcp(("127.0.0.1", self.port), Tcp)
        for s in (self.udp, self.tcp):
            threading.Thread(target=s.serve_forever, daemon=True).start()

    def asked(self, name: str) -> int:
        with self.lock:
            return sum(1 for _, n in self.queries if n == name)

    def close(self):
        for s in (self.udp, self.tcp):
            s.shutdown()
            s.server_close()


def _free_port() -> int:
    """A port free on 127.0.0.1 for both UDP and TCP."""
    for _ in range(50):
        t = socket.socket()
        t.bind(("127.0.0.1", 0))
        port = t.getsockname()[1]
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            u.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            t.close()
            u.close()
    raise RuntimeError("no free port")


def _as_the_daemonset(rootfs: Path):
    """preexec_fn: a private mount namespace with /proc, chroot into the tree,
    then root with only NET_ADMIN and NET_BIND_SERVICE left and no_new_privs,
    as securityContext {drop: ALL, add: [NET_ADMIN, NET_BIND_SERVICE],
    allowPrivilegeEscalation: false} gives the container."""
    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWNS, MS_REC, MS_PRIVATE = 0x00020000, 0x4000, 0x40000
    PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
    KEEP = {10, 12}  # CAP_NET_BIND_SERVICE, CAP_NET_ADMIN
    root = str(rootfs).encode()

    def setup():
        if libc.unshare(CLONE_NEWNS) != 0:
            os._exit(97)
        libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None)
        if libc.mount(b"proc", root + b"/proc", b"proc", 0, None) != 0:
            os._exit(98)
        os.chroot(root)
        os.chdir("/")
        for cap in range(64):
            if cap not in KEEP:
                libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the last cap: fine
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)

    return setup


def _dig(port: int, name: str, tcp=False, timeout=2) -> list[str]:
    if shutil.which("dig"):
        cmd = ["dig", "@127.0.0.1", "-p", str(port), name, "A", "+short", f"+time={timeout}", "+tries=1"]
        if tcp:
            cmd.append("+tcp")
        return run(cmd, timeout=timeout * 3).stdout.split()
    import dns.message
    import dns.query

    q = dns.message.make_query(name, "A")
    send = dns.query.tcp if tcp else dns.query.udp
    try:
        r = send(q, "127.0.0.1", port=port, timeout=timeout)
    except Exception:
        return []
    return [rr.to_text() for rrset in r.answer for rr in rrset]


def _http(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except OSError:
        return 0, ""


class Running:
    """nodedns started from the tree; collects its log lines."""

    def __init__(self, rootfs: Path, args: list[str]):
        self.proc = subprocess.Popen(
            ["/usr/bin/nodedns", *args],
            executable="/usr/bin/nodedns",
            preexec_fn=_as_the_daemonset(rootfs),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={"RUST_LOG": "info", "PATH": "/usr/sbin:/usr/bin"},
        )
        self.lines: list[str] = []
        # One reader thread owns the pipe: select() on a buffered text stream misses lines
        # already read into its buffer, so the test polls the collected lines instead.
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    def read_until(self, pattern: str, timeout: float) -> re.Match | None:
        end = time.monotonic() + timeout
        rx = re.compile(pattern)
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if m := rx.search(line):
                        return m
                seen = len(self.lines)
                left = end - time.monotonic()
                if left <= 0 or (not self._reader.is_alive() and seen == len(self.lines)):
                    return None
                self._cond.wait(min(left, 0.2))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def served(rootfs, nodedns_bin):
    require_flag(nodedns_bin, "--listen")
    if os.geteuid() != 0:
        pytest.skip("chroot and mount namespaces need root")
    if not _unshare_ok("-m"):
        pytest.skip("cannot create a mount namespace here")
    pytest.importorskip("dns.message")
    up = FakeUpstream()
    port, mport, hport = _free_port(), _free_port(), _free_port()
    n = Running(rootfs, [
        "--listen", f"127.0.0.1:{port}",
        "--upstream", f"127.0.0.1:{up.port}",
        "--cluster-dns", f"127.0.0.1:{up.port}",
        "--metrics", f"127.0.0.1:{mport}",
        "--health", f"127.0.0.1:{hport}",
    ])
    try:
        yield n, up, port, f"127.0.0.1:{mport}", f"127.0.0.1:{hport}"
    finally:
        n.stop()
        up.close()
        print("".join(n.lines[-40:]))


def test_serves_dns_from_the_tree(served, rendered):
    n, up, port, maddr, haddr = served
    # The startup lines name every bound address.
    for line in (rf"listening for UDP on 127\.0\.0\.1:{port}", rf"listening for TCP on 127\.0\.0\.1:{port}",
                 rf"serving .*{maddr}", rf"serving .*{haddr}"):
        assert n.read_until(line, 15), f"no log line like {line!r}:\n" + "".join(n.lines)

    # A miss over UDP, the same name from the cache over UDP and TCP.
    assert _dig(port, "example.test") == ["192.0.2.1"]
    assert _dig(port, "example.test") == ["192.0.2.1"]
    assert _dig(port, "example.test", tcp=True) == ["192.0.2.1"]
    assert up.asked("example.test.") == 1, up.queries
    # The cluster domain goes to --cluster-dns.
    assert _dig(port, "kubernetes.default.svc.cluster.local") == ["10.96.0.1"]

    assert _http(f"http://{haddr}/health")[0] == 200
    deadline = time.monotonic() + 20
    while _http(f"http://{haddr}/ready")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _http(f"http://{haddr}/ready")[0] == 200, "/ready never turned 200"

    # Every metric family the alert rules and the dashboard need is exported.
    from prometheus_client.parser import text_string_to_metric_families

    status, text = _http(f"http://{maddr}/metrics")
    assert status == 200
    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    families = {re.sub(r"_(bucket|sum|count|created)$", "", s) for s in samples} | set(samples)
    must = {
        "coredns_dns_requests_total", "coredns_dns_responses_total",
        "coredns_dns_request_duration_seconds", "coredns_cache_hits_total",
        "coredns_cache_misses_total", "coredns_forward_requests_total",
        "coredns_forward_responses_total", "coredns_panics_total", "coredns_build_info",
        "coredns_nodecache_setup_errors_total", "nodedns_upstream_queries_total",
        "nodedns_forward_inflight", "process_resident_memory_bytes",
    }
    assert must <= families, f"missing: {must - families}"
    errortypes = {s.labels.get("errortype") for f in text_string_to_metric_families(text)
                  for s in f.samples if s.name == "coredns_nodecache_setup_errors_total"}
    assert {"iptables", "iptables_lock", "interface_add", "interface_check", "configmap"} <= errortypes

    # Shutdown as the kubelet does it: SIGTERM, /ready 503 at once, DNS still
    # answered during lameduck, and out well within the pod's grace period.
    grace = find(rendered["base"]["docs"], "DaemonSet", "nodedns")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    t0 = time.monotonic()
    n.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert _http(f"http://{haddr}/ready")[0] == 503
    assert _dig(port, "during-lameduck.example.test") == ["192.0.2.1"]
    code = n.proc.wait(timeout=grace)
    took = time.monotonic() - t0
    print(f"exit {code} {took:.1f}s after SIGTERM (grace period {grace}s)")
    assert code == 0 and took < grace - 5


def test_daemonset_command_accepts_its_configmap_inside_the_tree(rootfs, rendered, nodedns_bin):
    """The container's exact command line, the ConfigMap at its mount path and
    a kubelet-style /etc/resolv.conf, inside the image's tree."""
    require_flag(nodedns_bin, "--check-config")
    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    for name in ("link-local", "transparent"):
        docs = rendered[name]["docs"]
        _, text, _ = config_of(docs)
        (rootfs / "etc/nodedns").mkdir(exist_ok=True)
        (rootfs / "etc/nodedns/nodedns.toml").write_text(text)
        (rootfs / "etc/resolv.conf").write_text("nameserver 127.0.0.1\n")
        c = container(docs)
        proc = subprocess.run(
            ["/usr/bin/nodedns", *c["args"], "--check-config"], executable="/usr/bin/nodedns",
            preexec_fn=_as_the_daemonset(rootfs), capture_output=True, text=True, timeout=30,
            env={e["name"]: e["value"] for e in c.get("env", [])} | UPSTREAM_ENV,
        )
        assert proc.returncode == 0, f"{name}: {proc.stdout}{proc.stderr}"
