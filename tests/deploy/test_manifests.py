"""Render every kustomization with a real kustomize, validate each manifest
against the Kubernetes OpenAPI schemas offline, validate the prometheus-operator
resources against that operator's schemas, and lint the security posture with
checkov (findings are fixed, or skipped with a reason next to the setting)."""

from __future__ import annotations

import json

import pytest

from conftest import (
    REPO,
    TARGETS,
    find,
    offline,
    run,
    tool,
)

# A current Kubernetes release, as shipped with kubernetes-validate.
K8S_VERSION = "1.37.0"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


@pytest.mark.parametrize("name", list(TARGETS))
def test_renders_expected_objects(rendered, name):
    kinds = sorted((d["kind"], d["metadata"]["name"].rsplit("-", 1)[0] if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("nodedns-") and "grafana" not in d["metadata"]["name"] else d["metadata"]["name"]) for d in rendered[name]["docs"])
    assert kinds == sorted(
        [
            ("ConfigMap", "nodedns"),
            ("ConfigMap", "nodedns-grafana-dashboard"),
            ("DaemonSet", "nodedns"),
            ("PrometheusRule", "nodedns"),
            ("Service", "kube-dns-upstream"),
            ("Service", "nodedns-metrics"),
            ("ServiceAccount", "nodedns"),
            ("ServiceMonitor", "nodedns"),
        ]
    )
    for d in rendered[name]["docs"]:
        assert d["metadata"].get("namespace") == "kube-system", d["metadata"]


@pytest.mark.parametrize("name", list(TARGETS))
def test_kubernetes_schemas(rendered, name):
    """Strict OpenAPI validation (unknown fields rejected), no network."""
    kv = tool("kubernetes-validate")
    res = run(offline([kv, "--strict", "-k", K8S_VERSION, rendered[name]["path"]]), timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    built_in = [d for d in rendered[name]["docs"] if d["kind"] not in CRD_KINDS]
    assert out.count("passed for resource") == len(built_in), out


def _unknown_fields(given, dumped, path="") -> list[str]:
    """Keys present in the manifest but dropped by the pydantic model (which
    ignores unknown fields instead of rejecting them)."""
    bad = []
    if isinstance(given, dict):
        for k, v in given.items():
            if not isinstance(dumped, dict) or k not in dumped:
                bad.append(f"{path}.{k}")
            else:
                bad += _unknown_fields(v, dumped[k], f"{path}.{k}")
    elif isinstance(given, list):
        for i, (g, d) in enumerate(zip(given, dumped or [])):
            bad += _unknown_fields(g, d, f"{path}[{i}]")
    return bad


@pytest.mark.parametrize("name", list(TARGETS))
def test_prometheus_operator_schemas(rendered, name):
    v1 = pytest.importorskip("cloudcoil.models.prometheus_operator.v1")
    for kind in sorted(CRD_KINDS):
        doc = find(rendered[name]["docs"], kind)
        obj = getattr(v1, kind).model_validate(doc)
        dumped = obj.model_dump(by_alias=True, exclude_unset=True, mode="json")
        assert not _unknown_fields(doc, dumped), f"{kind}: fields the CRD does not define"


def _checkov(args: list[str]) -> dict:
    ck = tool("checkov")
    res = run(offline([ck, *args, "--output", "json", "--skip-download"]), timeout=600)
    assert res.stdout.strip(), res.stderr[-3000:]
    data = json.loads(res.stdout)
    reports = data if isinstance(data, list) else [data]
    return {
        "failed": [c for r in reports for c in r.get("results", {}).get("failed_checks", [])],
        "skipped": [c for r in reports for c in r.get("results", {}).get("skipped_checks", [])],
        "passed": [c for r in reports for c in r.get("results", {}).get("passed_checks", [])],
    }


@pytest.mark.parametrize("name", list(TARGETS))
def test_checkov_kubernetes(rendered, name, tmp_path):
    # checkov scans directories best; give it the one rendered file.
    (tmp_path / f"{name}.yaml").write_text(rendered[name]["path"].read_text())
    res = _checkov(["-d", str(tmp_path), "--framework", "kubernetes"])
    failed = [f"{c['check_id']} {c['check_name']} ({c['resource']})" for c in res["failed"]]
    assert not failed, "checkov findings to fix or justify:\n" + "\n".join(failed)
    assert len(res["passed"]) > 50, "checkov ran suspiciously few checks"
    # Each accepted finding carries its reason (checkov.io/skipN: ID=reason).
    assert res["skipped"], "the DaemonSet's checkov.io/skip annotations were not seen"
    for c in res["skipped"]:
        reason = (c.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason) >= 20, f"{c['check_id']} skipped without a real reason: {reason!r}"


def test_checkov_dockerfile(tmp_path):
    (tmp_path / "Dockerfile").write_text((REPO / "Dockerfile").read_text())
    res = _checkov(["-d", str(tmp_path), "--framework", "dockerfile"])
    failed = [f"{c['check_id']} {c['check_name']}" for c in res["failed"]]
    assert not failed, "checkov Dockerfile findings:\n" + "\n".join(failed)
    assert res["passed"], "checkov ran no Dockerfile check"
    for c in res["skipped"]:
        reason = (c.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason) >= 20, f"{c['check_id']} skipped without a reason"


def test_checkov_skips_documented_in_manifest():
    """Every accepted checkov finding is also explained in a comment next to
    the setting it concerns (the annotation alone is easy to overlook)."""
    text = (REPO / "deploy/base/daemonset.yaml").read_text()
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#") or " # " in line)
    for check in ("CKV_K8S_19", "CKV_K8S_23", "CKV_K8S_11", "CKV_K8S_15"):
        assert check in comments, f"{check} has no comment beside its setting"
