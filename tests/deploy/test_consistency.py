"""The values that must agree across the manifests, the nodedns config, the
alert rules, the dashboard, and what `nodedns --check-config` accepts."""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib

import pytest
import yaml

from conftest import (
    DEPLOY,
    OVERLAYS,
    REPO,
    TARGETS,
    UPSTREAM_ENV,
    config_of,
    container,
    duration_s,
    find,
    hostport,
    quantity_bytes,
    require_flag,
    run,
    tool,
)

LINK_LOCAL = "169.254.20.10"
CLUSTER_KEYS = {"listen", "cluster_domain", "cluster_dns", "upstreams", "zone"}

# The metric names nodedns exports. Dashboards and alerts may use only these,
# plus the histogram series and Prometheus's own "up".
METRICS = {
    "coredns_dns_requests_total", "coredns_dns_responses_total",
    "coredns_dns_request_duration_seconds", "coredns_dns_request_size_bytes",
    "coredns_dns_response_size_bytes", "coredns_cache_entries", "coredns_cache_hits_total",
    "coredns_cache_misses_total", "coredns_cache_evictions_total",
    "coredns_forward_requests_total", "coredns_forward_responses_total",
    "coredns_forward_request_duration_seconds", "coredns_forward_healthcheck_failures_total",
    "coredns_panics_total", "coredns_build_info", "coredns_nodecache_setup_errors_total",
    "nodedns_upstream_queries_total", "nodedns_forward_inflight",
    "nodedns_upstream_tcp_connections", "nodedns_malformed_packets_total",
    "process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
    # serve-stale, prefetch, coalescing, health checks, the in-flight bound
    "coredns_cache_served_stale_total", "coredns_cache_prefetch_total",
    "nodedns_forward_coalesced_total", "coredns_forward_healthcheck_broken_total",
    "coredns_forward_max_concurrent_rejects_total", "coredns_cache_requests_total",
    # warm restarts: handover, snapshot
    "nodedns_cache_warm_loads_total", "nodedns_cache_warm_entries",
    "nodedns_cache_snapshot_writes_total", "nodedns_handovers_total",
    "nodedns_tcp_pressure_closes_total",
    # live reload
    "coredns_reload_failed_total", "nodedns_config_generation",
}
HISTOGRAMS = {
    "coredns_dns_request_duration_seconds", "coredns_dns_request_size_bytes",
    "coredns_dns_response_size_bytes", "coredns_forward_request_duration_seconds",
}
PROMQL_FUNCS = {
    "sum", "rate", "increase", "histogram_quantile", "max_over_time", "count", "by",
    "and", "on", "le", "max", "min", "avg", "without", "or", "unless", "offset",
}


def metric_names(expr: str) -> set[str]:
    """Metric-looking identifiers in a PromQL expression (label names inside
    braces and grouping clauses excluded)."""
    expr = re.sub(r"\{[^}]*\}", "{}", expr)                 # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)                 # ranges
    expr = re.sub(r'"[^"]*"', "", expr)
    names = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", expr))
    return {n for n in names if n not in PROMQL_FUNCS and not n.startswith("__")}


def allowed_metric(name: str) -> bool:
    if name in METRICS or name == "up":
        return True
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    return base in HISTOGRAMS


# --- the TOML ----------------------------------------------------------------

def _split(text: str) -> tuple[str, str]:
    head, sep, tail = text.partition("# --- end of cluster-specific")
    assert sep, "the cluster-specific block must end with '# --- end of cluster-specific'"
    assert "# --- cluster-specific" in head
    return head, tail


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_config_differs_only_in_cluster_block(overlay):
    """One place per overlay: only the marked block may differ from the base."""
    base = (DEPLOY / "base/nodedns.toml").read_text()
    mine = (DEPLOY / "overlays" / overlay / "nodedns.toml").read_text()
    assert _split(mine)[1] == _split(base)[1], "edit only the cluster-specific block"
    b, m = tomllib.loads(base), tomllib.loads(mine)
    changed = {k for k in set(b) | set(m) if b.get(k) != m.get(k)}
    assert changed <= CLUSTER_KEYS, changed
    block = tomllib.loads(_split(mine)[0].split("# --- cluster-specific", 1)[1].split("\n", 1)[1])
    assert set(block) <= CLUSTER_KEYS


def test_overlays_use_the_generated_config():
    for overlay in OVERLAYS:
        k = yaml.safe_load((DEPLOY / "overlays" / overlay / "kustomization.yaml").read_text())
        (gen,) = k["configMapGenerator"]
        assert gen["name"] == "nodedns" and gen["behavior"] == "replace"
        assert gen["files"] == ["nodedns.toml"]


@pytest.mark.parametrize("name", list(TARGETS))
def test_listen_addresses(rendered, name):
    cfg, _, _ = config_of(rendered[name]["docs"])
    ips = [ipaddress.ip_address(hostport(a)[0]) for a in cfg["listen"]]
    assert ipaddress.ip_address(LINK_LOCAL) in ips
    cluster = [ip for ip in ips if not ip.is_link_local]
    if name == "transparent":
        assert cluster, "transparent mode must also listen on the kube-dns ClusterIP"
        for addr in cfg.get("cluster_dns", []):
            assert ipaddress.ip_address(hostport(addr)[0]) not in ips, "cluster_dns would loop to ourselves"
    else:
        assert not cluster, f"{name} must listen on the link-local address only"
    assert cfg["node"]["setup_interface"] and cfg["node"]["setup_iptables"]


@pytest.mark.parametrize("name", list(TARGETS))
def test_surge_rollout_is_possible(rendered, name):
    # A hostNetwork pod's containerPorts are host ports: the scheduler would refuse the surge
    # pod on a node whose old pod still holds them.
    docs = rendered[name]["docs"]
    ds = find(docs, "DaemonSet", "nodedns")
    c = container(docs)
    assert "ports" not in c, "declared ports become host ports and block the surge pod"
    ru = ds["spec"]["updateStrategy"]["rollingUpdate"]
    assert ru["maxSurge"] == 1 and ru["maxUnavailable"] == 0
    # The handover between the old and the new pod goes through the state directory, a
    # hostPath both pods mount at the configured path.
    cfg, _, _ = config_of(docs)
    state = cfg["state"]["dir"]
    spec = ds["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert state in mounts and not mounts[state].get("readOnly", False)
    vol = vols[mounts[state]["name"]]
    assert vol["hostPath"] == {"path": state, "type": "DirectoryOrCreate"}
    assert cfg["state"]["warm_restart"] is True


@pytest.mark.parametrize("name", list(TARGETS))
def test_config_mount_and_args(rendered, name):
    docs = rendered[name]["docs"]
    c = container(docs)
    _, _, cm = config_of(docs)
    assert cm["metadata"]["name"].startswith("nodedns-"), "hash suffix rolls pods on config change"
    assert c["args"] == ["--config=/etc/nodedns/nodedns.toml"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["config"]["mountPath"] == "/etc/nodedns" and mounts["config"]["readOnly"]
    assert list(cm["data"]) == ["nodedns.toml"]


@pytest.mark.parametrize("name", list(TARGETS))
def test_probes_match_health_address(rendered, name):
    docs = rendered[name]["docs"]
    cfg, _, _ = config_of(docs)
    host, port = hostport(cfg["health"])
    c = container(docs)
    want = {"startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/ready"}
    for probe, path in want.items():
        g = c[probe]["httpGet"]
        assert (g["host"], g["port"], g["path"]) == (host, port, path), probe
    assert host in [hostport(a)[0] for a in cfg["listen"]], "the interface holds the health address"


@pytest.mark.parametrize("name", list(TARGETS))
def test_metrics_port_everywhere(rendered, name):
    docs = rendered[name]["docs"]
    cfg, _, _ = config_of(docs)
    _, port = hostport(cfg["metrics"])
    ds = find(docs, "DaemonSet", "nodedns")
    assert ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    svc = find(docs, "Service", "nodedns-metrics")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port)}
    (sp,) = svc["spec"]["ports"]
    assert (sp["name"], sp["port"], sp["targetPort"]) == ("metrics", port, port)
    assert svc["spec"]["selector"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    sm = find(docs, "ServiceMonitor", "nodedns")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
    # The job name the alerts and the dashboard select on.
    assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == "nodedns"


@pytest.mark.parametrize("name", list(TARGETS))
def test_kube_dns_upstream_service(rendered, name):
    svc = find(rendered[name]["docs"], "Service", "kube-dns-upstream")
    assert svc["spec"]["selector"] == {"k8s-app": "kube-dns"}
    assert "clusterIP" not in svc["spec"], "its own, allocated ClusterIP"
    assert sorted((p["port"], p["protocol"]) for p in svc["spec"]["ports"]) == [(53, "TCP"), (53, "UDP")]
    assert svc["metadata"]["labels"].get("k8s-app") != "kube-dns"
    # nodedns reads it from the Service env vars, so the Service comes first.
    kinds = [(d["kind"], d["metadata"]["name"]) for d in rendered[name]["docs"]]
    assert kinds.index(("Service", "kube-dns-upstream")) < kinds.index(("DaemonSet", "nodedns"))


@pytest.mark.parametrize("name", list(TARGETS))
def test_daemonset_hardening(rendered, name):
    docs = rendered[name]["docs"]
    ds = find(docs, "DaemonSet", "nodedns")
    spec = ds["spec"]["template"]["spec"]
    c = container(docs)
    cfg, _, _ = config_of(docs)
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "Default"
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]
    assert spec["automountServiceAccountToken"] is False and spec["serviceAccountName"] == "nodedns"
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_BIND_SERVICE"]}
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and not sc["privileged"]
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["xtables-lock"]["hostPath"] == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    assert {"name": "xtables-lock", "mountPath": "/run/xtables.lock"} in c["volumeMounts"]
    # The kubelet must not SIGKILL nodedns during lameduck + drain + teardown.
    drain = duration_s(cfg["lameduck"]) + duration_s(cfg["server"]["grace_period"])
    assert spec["terminationGracePeriodSeconds"] >= drain + 10
    # Memory: a limit above the cache bound, requests present, no CPU limit.
    res = c["resources"]
    limit = quantity_bytes(res["limits"]["memory"])
    assert limit >= 1.5 * cfg["cache"]["max_bytes"], "memory limit too close to cache.max_bytes"
    assert "cpu" not in res["limits"] and res["requests"]["cpu"] and res["requests"]["memory"]
    assert c["image"].startswith("ghcr.io/nodedns/nodedns:") and c["imagePullPolicy"] == "IfNotPresent"


# --- alert rules and dashboard ----------------------------------------------

def _rules(docs) -> list[dict]:
    rule = find(docs, "PrometheusRule", "nodedns")
    return [r for g in rule["spec"]["groups"] for r in g["rules"]]


def test_alerts_cover_the_failure_modes(rendered):
    alerts = {r["alert"]: r for r in _rules(rendered["base"]["docs"])}
    for needed in ("NodeDNSServfailRatioHigh", "NodeDNSLatencyP99High", "NodeDNSUpstreamTimeouts",
                   "NodeDNSUpstreamUnhealthy", "NodeDNSSetupErrors", "NodeDNSPanics", "NodeDNSDown",
                   "NodeDNSAllUpstreamsDown", "NodeDNSServingStale", "NodeDNSSnapshotRefused",
                   "NodeDNSSnapshotWriteErrors", "NodeDNSReloadRefused"):
        assert needed in alerts
    for r in alerts.values():
        assert r["labels"]["severity"] in ("warning", "critical")
        assert r["annotations"]["summary"] and r["annotations"]["description"]
        assert 'job="nodedns"' in r["expr"], f"{r['alert']} would also match CoreDNS"
        bad = {n for n in metric_names(r["expr"]) if not allowed_metric(n)}
        assert not bad, f"{r['alert']} uses metrics nodedns does not export: {bad}"


def test_alert_thresholds_track_the_config(rendered):
    """The memory and in-flight alerts are tied to the DaemonSet limit and the
    forward.max_inflight setting; change one, change the other."""
    docs = rendered["base"]["docs"]
    cfg, _, _ = config_of(docs)
    alerts = {r["alert"]: r for r in _rules(docs)}
    limit = quantity_bytes(container(docs)["resources"]["limits"]["memory"])
    mem = float(alerts["NodeDNSMemoryNearLimit"]["expr"].rsplit(">", 1)[1])
    assert mem == int(limit * 0.85)
    inflight = float(alerts["NodeDNSInflightSaturated"]["expr"].rsplit(">", 1)[1])
    assert inflight == int(cfg["forward"]["max_inflight"] * 0.8)


def _promtool_rules_file(rendered, tmp_path):
    rule = find(rendered["base"]["docs"], "PrometheusRule", "nodedns")
    path = tmp_path / "nodedns.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return path


def test_promtool_check_rules(rendered, tmp_path):
    promtool = tool("promtool")
    res = run([promtool, "check", "rules", _promtool_rules_file(rendered, tmp_path)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_alert_unit_tests(rendered, tmp_path):
    """tests/deploy/alerts_test.yaml feeds series to the rules and expects
    each alert to fire (or stay quiet)."""
    promtool = tool("promtool")
    _promtool_rules_file(rendered, tmp_path)
    test = tmp_path / "alerts_test.yaml"
    test.write_text((REPO / "tests/deploy/alerts_test.yaml").read_text())
    res = run([promtool, "test", "rules", test], cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dashboard(rendered):
    raw = (DEPLOY / "base/grafana/nodedns-dashboard.json").read_text()
    dash = json.loads(raw)
    cm = find(rendered["base"]["docs"], "ConfigMap", "nodedns-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["nodedns-dashboard.json"]) == dash
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("queries per second", "hit ratio", "latency", "rcode", "upstream", "setup errors"):
        assert topic in titles, topic
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert len(exprs) > 20
    for e in exprs:
        assert 'job="$job"' in e, e
        bad = {n for n in metric_names(e) if not allowed_metric(n)}
        assert not bad, f"{e}: {bad}"
    for p in panels:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}"
            y, h = p["gridPos"]["y"], p["gridPos"]["h"]
            assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 and h > 0 and y >= 0


# --- nodedns itself accepts the config ------------------------------------------

@pytest.mark.parametrize("name", list(TARGETS))
def test_check_config_accepts_configmap(rendered, name, nodedns_bin, tmp_path):
    require_flag(nodedns_bin, "--check-config")
    cfg, text, _ = config_of(rendered[name]["docs"])
    path = tmp_path / "nodedns.toml"
    path.write_text(text)
    # The DaemonSet's own arguments, with the mount path pointed at our copy.
    args = [a.replace("/etc/nodedns/nodedns.toml", str(path)) for a in container(rendered[name]["docs"])["args"]]
    env = {"PATH": "/usr/bin:/bin", **UPSTREAM_ENV}
    res = run([nodedns_bin, "--check-config", *args], env=env, timeout=30)
    assert res.returncode == 0, f"nodedns rejects the {name} ConfigMap:\n{res.stdout}{res.stderr}"
    out = res.stdout + res.stderr
    # The effective config names the addresses the manifests rely on.
    for addr in [*cfg["listen"], cfg["metrics"], cfg["health"]]:
        assert addr in out, f"{addr} not in the effective config:\n{out}"
    # cluster_dns is left to the kube-dns-upstream Service env, as kubelet sets
    # it: with the env nodedns has a cluster DNS, without it nodedns warns.
    assert "no cluster DNS configured" not in out, out
    bare = run([nodedns_bin, "--check-config", *args], env={"PATH": "/usr/bin:/bin"}, timeout=30)
    assert "no cluster DNS configured" in bare.stdout + bare.stderr, bare.stderr


def test_check_config_names_a_bad_key(nodedns_bin, tmp_path):
    require_flag(nodedns_bin, "--check-config")
    text = (DEPLOY / "base/nodedns.toml").read_text().replace("[cache]\n", "[cache]\nmax_entriez = 5\n")
    path = tmp_path / "bad.toml"
    path.write_text(text)
    res = run([nodedns_bin, "--check-config", "--config", path], env={"PATH": "/usr/bin:/bin", **UPSTREAM_ENV}, timeout=30)
    assert res.returncode != 0
    assert "max_entriez" in res.stdout + res.stderr
