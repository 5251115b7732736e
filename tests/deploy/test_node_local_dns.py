"""deploy/node-local-dns: nodedns run in node-local-dns's own DaemonSet. The patch is applied
with a real kustomize over a manifest of node-local-dns's shape (objects, names, args, volumes
and ports as the upstream addon ships them, after the documented sed), the result is checked
against the Kubernetes schemas, and the binary accepts the DaemonSet's exact args with the
ConfigMaps mounted where the DaemonSet mounts them."""

from __future__ import annotations

import json
import shutil

import yaml

from conftest import REPO, kustomize_build, offline, run, tool

PATCH_DIR = REPO / "deploy" / "node-local-dns"
COREFILE = REPO / "tests" / "fixtures" / "nodelocaldns-028f956d.Corefile"
LOCAL_DNS, DNS_SERVER, DOMAIN = "169.254.20.10", "10.96.0.10", "cluster.local"
ARGS = ["-localip", f"{LOCAL_DNS},{DNS_SERVER}", "-conf", "/etc/Corefile",
        "-upstreamsvc", "kube-dns-upstream", "-pidfile", "/tmp/node-cache.pid"]


def sed(text: str) -> str:
    """The substitutions node-local-dns's documentation makes (iptables mode)."""
    return (text.replace("__PILLAR__LOCAL__DNS__", LOCAL_DNS)
            .replace("__PILLAR__DNS__DOMAIN__", DOMAIN)
            .replace("__PILLAR__DNS__SERVER__", DNS_SERVER))


def corefile_template() -> str:
    return "".join(l for l in COREFILE.read_text().splitlines(True) if not l.startswith("#"))


def upstream_shaped_manifest() -> list[dict]:
    ns = "kube-system"
    container = {
        "name": "node-cache",
        "image": "registry.k8s.io/dns/k8s-dns-node-cache:1.26.4",
        "resources": {"requests": {"cpu": "25m", "memory": "5Mi"}},
        "args": ARGS,
        "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}},
        "ports": [{"containerPort": 53, "name": "dns", "protocol": "UDP"},
                  {"containerPort": 53, "name": "dns-tcp", "protocol": "TCP"},
                  {"containerPort": 9253, "name": "metrics", "protocol": "TCP"}],
        "livenessProbe": {"httpGet": {"host": LOCAL_DNS, "path": "/health", "port": 8080},
                          "initialDelaySeconds": 60, "timeoutSeconds": 5},
        "volumeMounts": [{"mountPath": "/run/xtables.lock", "name": "xtables-lock"},
                         {"name": "config-volume", "mountPath": "/etc/coredns"},
                         {"name": "kube-dns-config", "mountPath": "/etc/kube-dns"}],
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "node-local-dns", "namespace": ns}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "kube-dns-upstream", "namespace": ns},
         "spec": {"selector": {"k8s-app": "kube-dns"},
                  "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                            {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53}]}},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "node-local-dns", "namespace": ns},
         "data": {"Corefile": sed(corefile_template())}},
        {"apiVersion": "apps/v1", "kind": "DaemonSet",
         "metadata": {"name": "node-local-dns", "namespace": ns},
         "spec": {
             "updateStrategy": {"rollingUpdate": {"maxUnavailable": "10%"}},
             "selector": {"matchLabels": {"k8s-app": "node-local-dns"}},
             "template": {
                 "metadata": {"labels": {"k8s-app": "node-local-dns"}},
                 "spec": {
                     "priorityClassName": "system-node-critical",
                     "serviceAccountName": "node-local-dns",
                     "hostNetwork": True,
                     "dnsPolicy": "Default",
                     "containers": [container],
                     "volumes": [
                         {"name": "xtables-lock",
                          "hostPath": {"path": "/run/xtables.lock", "type": "FileOrCreate"}},
                         {"name": "kube-dns-config",
                          "configMap": {"name": "kube-dns", "optional": True}},
                         {"name": "config-volume",
                          "configMap": {"name": "node-local-dns",
                                        "items": [{"key": "Corefile",
                                                   "path": "Corefile.base"}]}},
                     ],
                 }}}},
    ]


def render(tmp_path) -> list[dict]:
    d = tmp_path / "node-local-dns"
    shutil.copytree(PATCH_DIR, d)
    (d / "nodelocaldns.yaml").write_text(yaml.safe_dump_all(upstream_shaped_manifest()))
    return [doc for doc in yaml.safe_load_all(kustomize_build(d)) if doc]


def daemonset(docs):
    return next(d for d in docs if d["kind"] == "DaemonSet")


def test_patch_swaps_the_image_and_keeps_node_caches_interface(tmp_path):
    docs = render(tmp_path)
    assert {d["kind"] for d in docs} == {"ServiceAccount", "Service", "ConfigMap", "DaemonSet"}
    ds = daemonset(docs)
    spec = ds["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["name"] == "node-cache"
    assert c["image"] == "nodedns:latest"
    # node-cache's command line, probe and mounts as they were.
    assert c["args"] == ARGS
    assert c["livenessProbe"]["httpGet"] == {"host": LOCAL_DNS, "path": "/health", "port": 8080}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {"xtables-lock": "/run/xtables.lock", "config-volume": "/etc/coredns",
                      "kube-dns-config": "/etc/kube-dns", "nodedns-state": "/run/nodedns"}
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["nodedns-state"]["hostPath"] == {"path": "/run/nodedns",
                                                 "type": "DirectoryOrCreate"}
    assert vols["config-volume"]["configMap"]["items"][0]["path"] == "Corefile.base"
    # A surge rollout: the new pod beside the old one, never a node without DNS; no hostPorts
    # (with hostNetwork every containerPort is one) that would keep the surge pod off the node.
    assert ds["spec"]["updateStrategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert "ports" not in c


def test_patched_manifest_passes_the_kubernetes_schemas(tmp_path):
    docs = render(tmp_path)
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    kv = tool("kubernetes-validate")
    res = run(offline([kv, "--strict", "-k", "1.37.0", path]), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_nodedns_accepts_the_daemonsets_args(tmp_path, nodedns_bin):
    """The binary with the DaemonSet's exact args, the ConfigMaps where the pod mounts them
    (moved under tmp_path by node-cache's own -basecorefile and -kubednscm) and the Service environment
    kubelet gives the pod: the configuration node-local-dns would run."""
    docs = render(tmp_path)
    c = daemonset(docs)["spec"]["template"]["spec"]["containers"][0]
    corefile = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["Corefile"]
    etc = tmp_path / "etc"
    (etc / "coredns").mkdir(parents=True)
    (etc / "coredns" / "Corefile.base").write_text(corefile)
    (etc / "kube-dns").mkdir()
    (etc / "kube-dns" / "stubDomains").write_text(json.dumps({"corp.example": ["10.0.0.53"]}))
    (etc / "kube-dns" / "upstreamNameservers").write_text(json.dumps(["10.0.0.2"]))
    res = run([nodedns_bin, *c["args"],
               "-basecorefile", etc / "coredns" / "Corefile.base",
               "-kubednscm", etc / "kube-dns", "--check-config"],
              env={"KUBE_DNS_UPSTREAM_SERVICE_HOST": "10.96.0.11",
                   "KUBE_DNS_UPSTREAM_SERVICE_PORT": "53", "PATH": "/usr/bin:/bin"},
              timeout=60)
    assert res.returncode == 0, res.stderr
    import tomllib
    cfg = tomllib.loads(res.stdout)
    assert sorted(cfg["listen"]) == sorted([f"{LOCAL_DNS}:53", f"{DNS_SERVER}:53"])
    assert cfg["upstreams"] == ["10.0.0.2:53"]
    zones = {z["name"]: z for z in cfg["zone"]}
    assert zones["cluster.local"]["upstreams"] == ["10.96.0.11:53"]
    assert zones["cluster.local"]["transport"] == "tcp"
    assert zones["corp.example"]["upstreams"] == ["10.0.0.53:53"]
    assert cfg["node"]["setup_interface"] and cfg["node"]["setup_iptables"]
