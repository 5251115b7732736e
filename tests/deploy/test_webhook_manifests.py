"""The admission webhook's manifests (deploy/webhook): rendered with a real
kustomize, validated against the Kubernetes schemas (cert-manager's resources
against cert-manager's), linted by checkov, and checked for the settings the
webhook depends on: failure policy Ignore with a short timeout, selectors,
least privilege, ports, certificate names, and the link-local address."""

from __future__ import annotations

import pytest

from conftest import (
    DEPLOY,
    WEBHOOK_TARGETS,
    find,
    hostport,
    offline,
    run,
    tool,
)
from test_manifests import K8S_VERSION, _checkov, _unknown_fields

CERT_MANAGER_KINDS = {"Certificate", "Issuer"}


def _deployment(docs):
    return find(docs, "Deployment", "nodedns-inject")


def _container(docs):
    (c,) = _deployment(docs)["spec"]["template"]["spec"]["containers"]
    return c


def _flags(docs) -> dict[str, list[str]]:
    """--name=value arguments of the webhook container, by name."""
    out: dict[str, list[str]] = {}
    for a in _container(docs)["args"]:
        name, _, value = a.removeprefix("--").partition("=")
        out.setdefault(name, []).append(value)
    return out


@pytest.mark.parametrize("name", list(WEBHOOK_TARGETS))
def test_renders_expected_objects(rendered_webhook, name):
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in rendered_webhook[name]["docs"])
    want = [
        ("Deployment", "nodedns-inject"),
        ("MutatingWebhookConfiguration", "nodedns-inject"),
        ("NetworkPolicy", "nodedns-inject"),
        ("PodDisruptionBudget", "nodedns-inject"),
        ("Service", "nodedns-inject"),
        ("ServiceAccount", "nodedns-inject"),
    ]
    if name == "webhook-cert-manager":
        want += [
            ("Certificate", "nodedns-inject-ca"),
            ("Certificate", "nodedns-inject-tls"),
            ("Issuer", "nodedns-inject-ca"),
            ("Issuer", "nodedns-inject-selfsigned"),
        ]
    assert kinds == sorted(want)
    for d in rendered_webhook[name]["docs"]:
        if d["kind"] != "MutatingWebhookConfiguration":
            assert d["metadata"].get("namespace") == "kube-system", d["metadata"]


@pytest.mark.parametrize("name", list(WEBHOOK_TARGETS))
def test_kubernetes_schemas(rendered_webhook, name):
    kv = tool("kubernetes-validate")
    res = run(offline([kv, "--strict", "-k", K8S_VERSION, rendered_webhook[name]["path"]]), timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    built_in = [d for d in rendered_webhook[name]["docs"] if d["kind"] not in CERT_MANAGER_KINDS]
    assert out.count("passed for resource") == len(built_in), out


def test_cert_manager_schemas(rendered_webhook):
    v1 = pytest.importorskip("cloudcoil.models.cert_manager.v1")
    docs = [d for d in rendered_webhook["webhook-cert-manager"]["docs"] if d["kind"] in CERT_MANAGER_KINDS]
    assert len(docs) == 4
    for doc in docs:
        obj = getattr(v1, doc["kind"]).model_validate(doc)
        dumped = obj.model_dump(by_alias=True, exclude_unset=True, mode="json")
        assert not _unknown_fields(doc, dumped), f"{doc['kind']} {doc['metadata']['name']}: fields cert-manager does not define"


@pytest.mark.parametrize("name", list(WEBHOOK_TARGETS))
def test_checkov_kubernetes(rendered_webhook, name, tmp_path):
    (tmp_path / f"{name}.yaml").write_text(rendered_webhook[name]["path"].read_text())
    res = _checkov(["-d", str(tmp_path), "--framework", "kubernetes"])
    failed = [f"{c['check_id']} {c['check_name']} ({c['resource']})" for c in res["failed"]]
    assert not failed, "checkov findings to fix or justify:\n" + "\n".join(failed)
    assert len(res["passed"]) > 40, "checkov ran suspiciously few checks"
    for c in res["skipped"]:
        reason = (c.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason) >= 20, f"{c['check_id']} skipped without a real reason: {reason!r}"


@pytest.mark.parametrize("name", list(WEBHOOK_TARGETS))
def test_deployment_hardening(rendered_webhook, name):
    docs = rendered_webhook[name]["docs"]
    dep = _deployment(docs)
    spec = dep["spec"]["template"]["spec"]
    c = _container(docs)
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = find(docs, "PodDisruptionBudget", "nodedns-inject")
    assert pdb["spec"]["minAvailable"] == 1
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert labels.get("node-local-dns-injection") == "disabled"
    assert spec.get("hostNetwork") is not True
    assert spec["automountServiceAccountToken"] is False
    assert find(docs, "ServiceAccount", spec["serviceAccountName"])["automountServiceAccountToken"] is False
    assert not [d for d in docs if d["kind"] in {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}]
    psc = spec["securityContext"]
    assert psc["runAsNonRoot"] and psc["runAsUser"] != 0 and psc["seccompProfile"]["type"] == "RuntimeDefault"
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and not sc["privileged"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] != 0
    res = c["resources"]
    assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"]
    assert c["image"].startswith("ghcr.io/nodedns/nodedns-inject:"), "the Dockerfile's inject target"
    # Probes on the plain-HTTP port the webhook serves /ready and /health on.
    flags = _flags(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert hostport(flags["metrics"][0])[1] == ports["metrics"]
    assert hostport(flags["listen"][0])[1] == ports["https"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}
    # The certificate files come from the Secret volume.
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert flags["tls-cert"][0] == f"{mounts['tls']}/tls.crt"
    assert flags["tls-key"][0] == f"{mounts['tls']}/tls.key"


@pytest.mark.parametrize("name", list(WEBHOOK_TARGETS))
def test_webhook_configuration(rendered_webhook, name):
    docs = rendered_webhook[name]["docs"]
    mwc = find(docs, "MutatingWebhookConfiguration", "nodedns-inject")
    (hook,) = mwc["webhooks"]
    assert hook["failurePolicy"] == "Ignore", "an outage must never block pod creation"
    assert hook["timeoutSeconds"] <= 3
    assert hook["sideEffects"] == "None" and hook["admissionReviewVersions"] == ["v1"]
    assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                              "resources": ["pods"], "scope": "Namespaced"}]
    ns_sel = hook["namespaceSelector"]
    assert ns_sel["matchLabels"] == {"node-local-dns-injection": "enabled"}
    (excl,) = ns_sel["matchExpressions"]
    assert excl["key"] == "kubernetes.io/metadata.name" and excl["operator"] == "NotIn"
    assert sorted(excl["values"]) == sorted(_flags(docs)["exclude-namespace"]), \
        "the selector and the webhook's --exclude-namespace must name the same namespaces"
    assert hook["objectSelector"]["matchExpressions"] == [
        {"key": "node-local-dns-injection", "operator": "NotIn", "values": ["disabled"]}]
    svc_ref = hook["clientConfig"]["service"]
    assert svc_ref["path"] == "/mutate" and svc_ref["namespace"] == "kube-system"
    svc = find(docs, "Service", svc_ref["name"])
    (port,) = [p for p in svc["spec"]["ports"] if p["port"] == svc_ref["port"]]
    assert port["targetPort"] == "https"
    assert svc["spec"]["selector"].items() <= _deployment(docs)["spec"]["template"]["metadata"]["labels"].items()


def test_cert_manager_wiring(rendered_webhook):
    docs = rendered_webhook["webhook-cert-manager"]["docs"]
    mwc = find(docs, "MutatingWebhookConfiguration", "nodedns-inject")
    ns, _, cert_name = mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].partition("/")
    cert = find(docs, "Certificate", cert_name)
    assert ns == cert["metadata"]["namespace"] == "kube-system"
    vols = {v["name"]: v for v in _deployment(docs)["spec"]["template"]["spec"]["volumes"]}
    assert vols["tls"]["secret"]["secretName"] == cert["spec"]["secretName"]
    svc = mwc["webhooks"][0]["clientConfig"]["service"]
    assert f"{svc['name']}.{svc['namespace']}.svc" in cert["spec"]["dnsNames"]
    issuer = find(docs, "Issuer", cert["spec"]["issuerRef"]["name"])
    ca = find(docs, "Certificate", issuer["spec"]["ca"]["secretName"])
    assert ca["spec"]["isCA"] is True
    # Without cert-manager the MutatingWebhookConfiguration carries no annotation.
    plain = find(rendered_webhook["webhook"]["docs"], "MutatingWebhookConfiguration")
    assert "cert-manager.io/inject-ca-from" not in plain["metadata"].get("annotations", {})


def test_local_dns_is_the_link_local_listen_address(rendered_webhook):
    import tomllib

    cfg = tomllib.loads((DEPLOY / "overlays/link-local/nodedns.toml").read_text())
    hosts = [hostport(a)[0] for a in cfg["listen"]]
    flags = _flags(rendered_webhook["webhook"]["docs"])
    assert flags["local-dns"] == [hosts[0]], "pods must be pointed where the DaemonSet listens"


def test_deployment_args_are_accepted(rendered_webhook, inject_bin, tmp_path):
    """The release binary accepts the Deployment's flags: it gets past validation
    (exit 78 would be a refused flag) and stops at the missing certificate."""
    flags = _container(rendered_webhook["webhook"]["docs"])["args"]
    args = [a for a in flags if not a.startswith(("--listen=", "--metrics="))]
    res = run([inject_bin, *args, "--listen=127.0.0.1:0", "--metrics=127.0.0.1:0"],
              env={"KUBE_DNS_SERVICE_HOST": "10.96.0.10", "PATH": "/usr/bin:/bin"}, timeout=30)
    assert res.returncode == 1, res.stderr
    assert "/etc/nodedns-inject/tls/tls.crt" in res.stderr
