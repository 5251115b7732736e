"""The admission webhook as shipped: the release binary (built as the Dockerfile
builds it) runs `nodedns-inject` with the Deployment's flags and a certificate
made by deploy/webhook/gen-certs.sh (openssl), and answers AdmissionReviews over
HTTPS. Each rule is proven by applying the returned JSONPatch to the pod and
validating the result against the Kubernetes schema (kubernetes-validate)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import uuid

import pytest

from conftest import DEPLOY, WEBHOOK, find, run, tool
from test_manifests import K8S_VERSION

KUBE_DNS = "10.96.0.10"
SERVER_NAME = "nodedns-inject.kube-system.svc"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    tool("openssl")
    d = tmp_path_factory.mktemp("webhook-tls")
    res = run(["sh", WEBHOOK / "gen-certs.sh", "--out", d], timeout=60)
    assert res.returncode == 0, res.stderr
    for f in ("ca.crt", "tls.crt", "tls.key"):
        assert (d / f).stat().st_size > 0, f
    # The serving certificate verifies against the CA for the Service's name.
    res = run(["openssl", "verify", "-CAfile", d / "ca.crt", "-verify_hostname", SERVER_NAME, d / "tls.crt"])
    assert res.returncode == 0, res.stdout + res.stderr
    return d


class Webhook:
    """A running nodedns-inject started with argv; clients trust certs/ca.crt."""

    def __init__(self, argv, certs):
        self.proc = subprocess.Popen(
            [str(a) for a in argv],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            # kubelet's service link for kube-dns, as the Deployment relies on.
            env={"KUBE_DNS_SERVICE_HOST": KUBE_DNS, "RUST_LOG": "info", "PATH": "/usr/bin:/bin"},
        )
        self.log: list[str] = []
        found: dict[str, tuple[str, int]] = {}
        ready = threading.Event()

        def reader():
            for line in self.proc.stderr:
                self.log.append(line)
                for key, pat in (("https", r"listening for HTTPS on ([0-9.]+):(\d+)"),
                                 ("metrics", r"serving metrics on ([0-9.]+):(\d+)")):
                    m = re.search(pat, line)
                    if m:
                        found[key] = (m.group(1), int(m.group(2)))
                if len(found) == 2:
                    ready.set()

        threading.Thread(target=reader, daemon=True).start()
        if not ready.wait(20):
            self.proc.kill()
            pytest.fail("nodedns-inject did not start:\n" + "".join(self.log))
        self.https, self.metrics = found["https"], found["metrics"]
        self.ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))

    def request(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        with socket.create_connection(self.https, timeout=10) as raw:
            with self.ctx.wrap_socket(raw, server_hostname=SERVER_NAME) as s:
                s.sendall(head + body)
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        head_end = data.index(b"\r\n\r\n")
        status = int(data.split(b" ", 2)[1])
        return status, data[head_end + 4:]

    def post(self, body: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
        head = (f"POST /mutate?timeout=2s HTTP/1.1\r\nHost: {SERVER_NAME}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        return self.request(head, body)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None


@pytest.fixture(scope="module")
def webhook(rendered_webhook, inject_bin, certs):
    """The release binary with the rendered Deployment's flags (addresses moved to loopback)."""
    dep = find(rendered_webhook["webhook"]["docs"], "Deployment", "nodedns-inject")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    args = [a for a in c["args"] if not a.startswith(("--listen=", "--metrics=", "--tls-"))]
    w = Webhook([inject_bin, *args, "--listen=127.0.0.1:0", "--metrics=127.0.0.1:0",
                 "--shutdown-delay=0s", "--tls-cert", certs / "tls.crt", "--tls-key", certs / "tls.key"],
                certs)
    yield w
    assert w.stop() == 0, "".join(w.log)


def _pod(namespace, labels=None, **spec):
    s = {
        "containers": [{"name": "app", "image": "registry.example/app:1.0",
                        "imagePullPolicy": "IfNotPresent",
                        "terminationMessagePath": "/dev/termination-log",
                        "terminationMessagePolicy": "File", "resources": {}}],
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 30,
        "dnsPolicy": "ClusterFirst",
        "serviceAccountName": "default",
        "schedulerName": "default-scheduler",
        "securityContext": {},
        "enableServiceLinks": True,
        "priority": 0,
    }
    s.update(spec)
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "app-5f7b9c-", "namespace": namespace, "labels": labels or {"app": "web"}},
            "spec": s}


def _review(namespace, pod):
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                         "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def _admit(webhook, namespace, pod):
    """(pod after the response's patch, response) — the pod validated before and after."""
    import jsonpatch
    import kubernetes_validate

    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    review = _review(namespace, pod)
    status, body = webhook.post(json.dumps(review).encode())
    assert status == 200, body
    resp = json.loads(body)
    assert resp["apiVersion"] == "admission.k8s.io/v1" and resp["kind"] == "AdmissionReview"
    r = resp["response"]
    assert r["uid"] == review["request"]["uid"] and r["allowed"] is True
    out = pod
    if "patch" in r:
        assert r["patchType"] == "JSONPatch"
        ops = json.loads(base64.b64decode(r["patch"]))
        out = jsonpatch.apply_patch(pod, ops)
        # Raises with the failing field if the patched pod breaks the schema.
        kubernetes_validate.validate(out, K8S_VERSION, strict=True)
    return out, r


def _expected(ns):
    return {
        "nameservers": ["169.254.20.10", KUBE_DNS],
        "searches": [f"{ns}.svc.cluster.local", "svc.cluster.local", "cluster.local"],
        "options": [{"name": "ndots", "value": "5"}, {"name": "attempts", "value": "2"},
                    {"name": "timeout", "value": "2"}],
    }


def test_inject(webhook):
    pytest.importorskip("kubernetes_validate")
    pytest.importorskip("jsonpatch")
    out, _ = _admit(webhook, "team-a", _pod("team-a"))
    assert out["spec"]["dnsPolicy"] == "None"
    assert out["spec"]["dnsConfig"] == _expected("team-a")


def test_opt_out_label(webhook):
    pytest.importorskip("kubernetes_validate")
    pod = _pod("team-a", labels={"app": "web", "node-local-dns-injection": "disabled"})
    out, r = _admit(webhook, "team-a", pod)
    assert "patch" not in r and out == pod


def test_host_network(webhook):
    pytest.importorskip("kubernetes_validate")
    pod = _pod("infra", hostNetwork=True, dnsPolicy="ClusterFirstWithHostNet")
    out, _ = _admit(webhook, "infra", pod)
    assert out["spec"]["dnsPolicy"] == "None" and out["spec"]["hostNetwork"] is True
    assert out["spec"]["dnsConfig"] == _expected("infra")
    pod = _pod("infra", hostNetwork=True, dnsPolicy="ClusterFirst")
    out, r = _admit(webhook, "infra", pod)
    assert "patch" not in r, "hostNetwork + ClusterFirst uses the node's resolv.conf"


def test_existing_dns_config_is_merged(webhook):
    pytest.importorskip("kubernetes_validate")
    pod = _pod("team-b", dnsConfig={"nameservers": ["10.0.0.53"], "searches": ["corp.example"],
                                    "options": [{"name": "ndots", "value": "2"}, {"name": "edns0"}]})
    out, _ = _admit(webhook, "team-b", pod)
    assert out["spec"]["dnsPolicy"] == "None"
    cfg = out["spec"]["dnsConfig"]
    assert cfg["nameservers"] == ["169.254.20.10", KUBE_DNS, "10.0.0.53"]
    assert cfg["searches"] == ["corp.example", "team-b.svc.cluster.local", "svc.cluster.local", "cluster.local"]
    assert cfg["options"] == [{"name": "ndots", "value": "2"}, {"name": "attempts", "value": "2"},
                              {"name": "timeout", "value": "2"}, {"name": "edns0"}]


@pytest.mark.parametrize("policy", ["Default", "None"])
def test_other_dns_policy(webhook, policy):
    pytest.importorskip("kubernetes_validate")
    extra = {"dnsConfig": {"nameservers": ["192.0.2.53"]}} if policy == "None" else {}
    pod = _pod("team-a", dnsPolicy=policy, **extra)
    out, r = _admit(webhook, "team-a", pod)
    assert "patch" not in r and out == pod


@pytest.mark.parametrize("ns", ["kube-system", "kube-public"])
def test_excluded_namespace(webhook, ns):
    pytest.importorskip("kubernetes_validate")
    pod = _pod(ns)
    out, r = _admit(webhook, ns, pod)
    assert "patch" not in r and out == pod


def test_bad_requests_then_still_serving(webhook):
    status, body = webhook.post(b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionRev')
    assert status == 400 and b"malformed AdmissionReview" in body
    v1beta1 = _review("team-a", _pod("team-a"))
    v1beta1["apiVersion"] = "admission.k8s.io/v1beta1"
    status, body = webhook.post(json.dumps(v1beta1).encode())
    assert status == 400 and b"admission.k8s.io/v1beta1" in body
    status, body = webhook.post(b"{}", content_type="text/plain")
    assert status == 415
    head = (f"POST /mutate HTTP/1.1\r\nHost: {SERVER_NAME}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {64 * 1024 * 1024}\r\nConnection: close\r\n\r\n").encode()
    status, body = webhook.request(head, b"")
    assert status == 413
    assert webhook.proc.poll() is None
    status, _ = webhook.post(json.dumps(_review("team-a", _pod("team-a"))).encode())
    assert status == 200


def test_metrics_and_readiness(webhook):
    from prometheus_client.parser import text_string_to_metric_families
    import urllib.request

    def sample(name, **labels):
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        for f in text_string_to_metric_families(text):
            for s in f.samples:
                if s.name == name and s.labels == labels:
                    return s.value
        return 0.0

    host, port = webhook.metrics
    with urllib.request.urlopen(f"http://{host}:{port}/ready", timeout=5) as r:
        assert r.status == 200
    assert sample("nodedns_inject_ready") == 1
    before = (sample("nodedns_inject_requests_total", code="200"),
              sample("nodedns_inject_patches_total", mode="inject"),
              sample("nodedns_inject_skipped_total", reason="excluded_namespace"),
              sample("nodedns_inject_errors_total", reason="content_type"))
    assert webhook.post(json.dumps(_review("team-a", _pod("team-a"))).encode())[0] == 200
    assert webhook.post(json.dumps(_review("kube-system", _pod("kube-system"))).encode())[0] == 200
    assert webhook.post(b"{}", content_type="application/xml")[0] == 415
    after = (sample("nodedns_inject_requests_total", code="200"),
             sample("nodedns_inject_patches_total", mode="inject"),
             sample("nodedns_inject_skipped_total", reason="excluded_namespace"),
             sample("nodedns_inject_errors_total", reason="content_type"))
    assert [a - b for a, b in zip(after, before)] == [2, 1, 1, 1]


def test_image_tree_serves_as_non_root(inject_bin, certs, tmp_path):
    """The webhook image's content (the Dockerfile's inject target): the tree
    stage-rootfs.sh --no-firewall assembles holds the binary, its libraries and
    the users, nothing else, and nodedns-inject serves from it chrooted as 65532."""
    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    chroot = tool("chroot")
    root = tmp_path / "rootfs"
    res = run(["sh", DEPLOY / "image/stage-rootfs.sh", "--no-firewall", inject_bin, root], timeout=120)
    assert res.returncode == 0, res.stderr
    names = {p.name for p in root.rglob("*") if p.is_file()}
    assert "nodedns-inject" in names
    for absent in ("nodedns", "nft", "xtables-nft-multi", "sh", "bash", "busybox"):
        assert absent not in names, f"{absent} must not be in the webhook image"
    tls = root / "etc/nodedns-inject/tls"
    tls.mkdir(parents=True)
    for f in ("tls.crt", "tls.key"):
        shutil.copy(certs / f, tls / f)
        os.chown(tls / f, 0, 65532)
        os.chmod(tls / f, 0o440)
    w = Webhook([chroot, "--userspec=65532:65532", root, "/usr/bin/nodedns-inject",
                 "--listen=127.0.0.1:0", "--metrics=127.0.0.1:0", "--shutdown-delay=0s"], certs)
    try:
        pod = _pod("team-a")
        status, body = w.post(json.dumps(_review("team-a", pod)).encode())
        assert status == 200, body
        assert json.loads(body)["response"]["patchType"] == "JSONPatch"
    finally:
        assert w.stop() == 0, "".join(w.log)
