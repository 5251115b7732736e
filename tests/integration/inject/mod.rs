//! `nodedns-inject`, the admission webhook, as the API server uses it: the real binary started
//! with a certificate from a test CA, AdmissionReviews (the admission.k8s.io/v1 shapes of the
//! Kubernetes API reference) POSTed over HTTPS, each returned JSONPatch applied to the pod.
//! The pods that come out are also checked against the Kubernetes schema by
//! tests/deploy/test_inject.py (kubernetes-validate).

mod harness;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use harness::*;

fn expected_config(ns: &str) -> Value {
    json!({
        "nameservers": ["169.254.20.10", KUBE_DNS],
        "searches": [format!("{ns}.svc.cluster.local"), "svc.cluster.local", "cluster.local"],
        "options": [{"name": "ndots", "value": "5"}, {"name": "attempts", "value": "2"},
                    {"name": "timeout", "value": "2"}]
    })
}

#[test]
fn cluster_first_pod_gets_node_local_then_kube_dns() {
    let w = Webhook::start(&[]);
    let p = pod("team-a", json!({"app": "web"}), json!({}));
    let out = patched(&p, &w.review(&review_of("team-a", &p)));
    assert_eq!(out["spec"]["dnsPolicy"], "None");
    assert_eq!(out["spec"]["dnsConfig"], expected_config("team-a"));
    // Nothing else changed.
    let mut back = out.clone();
    back["spec"]["dnsPolicy"] = json!("ClusterFirst");
    back["spec"].as_object_mut().unwrap().remove("dnsConfig");
    assert_eq!(back, p);
    assert_eq!(
        w.metric("nodedns_inject_patches_total", "mode=\"inject\""),
        1.0
    );
    assert_eq!(
        w.metric("nodedns_inject_requests_total", "code=\"200\""),
        1.0
    );
}

#[test]
fn configured_addresses_domain_and_options_are_used() {
    let w = Webhook::start(&[
        "--local-dns=169.254.0.53",
        "--cluster-domain=k8s.example",
        "--extra-search=corp.example",
        "--ndots=3",
        "--timeout=1",
        "--option=single-request-reopen",
    ]);
    let p = pod("shop", json!({}), json!({}));
    let out = patched(&p, &w.review(&review_of("shop", &p)));
    assert_eq!(
        out["spec"]["dnsConfig"],
        json!({
            "nameservers": ["169.254.0.53", KUBE_DNS],
            "searches": ["shop.svc.k8s.example", "svc.k8s.example", "k8s.example", "corp.example"],
            "options": [{"name": "ndots", "value": "3"}, {"name": "attempts", "value": "2"},
                        {"name": "timeout", "value": "1"}, {"name": "single-request-reopen"}]
        })
    );
}

#[test]
fn opt_out_label_leaves_the_pod_alone() {
    let w = Webhook::start(&[]);
    let p = pod(
        "team-a",
        json!({"app": "web", "node-local-dns-injection": "disabled"}),
        json!({}),
    );
    let r = w.review(&review_of("team-a", &p));
    assert!(r["response"].get("patch").is_none(), "{r}");
    assert_eq!(patched(&p, &r), p);
    assert_eq!(
        w.metric("nodedns_inject_skipped_total", "reason=\"opted_out\""),
        1.0
    );
    // Any other value of the label is no opt-out.
    let p = pod(
        "team-a",
        json!({"node-local-dns-injection": "enabled"}),
        json!({}),
    );
    assert_eq!(
        patched(&p, &w.review(&review_of("team-a", &p)))["spec"]["dnsPolicy"],
        "None"
    );
}

#[test]
fn host_network_pods_only_with_cluster_first_with_host_net() {
    let w = Webhook::start(&[]);
    let p = pod(
        "infra",
        json!({}),
        json!({"hostNetwork": true, "dnsPolicy": "ClusterFirstWithHostNet"}),
    );
    let out = patched(&p, &w.review(&review_of("infra", &p)));
    assert_eq!(out["spec"]["dnsPolicy"], "None");
    assert_eq!(out["spec"]["hostNetwork"], true);
    assert_eq!(out["spec"]["dnsConfig"], expected_config("infra"));
    // hostNetwork with ClusterFirst uses the node's resolv.conf: left alone.
    let p = pod("infra", json!({}), json!({"hostNetwork": true}));
    let r = w.review(&review_of("infra", &p));
    assert!(r["response"].get("patch").is_none(), "{r}");
}

#[test]
fn own_dns_config_is_merged_as_kubelet_merges_it() {
    let w = Webhook::start(&[]);
    let own = json!({"nameservers": ["10.0.0.53"], "searches": ["corp.example"],
                     "options": [{"name": "ndots", "value": "2"}, {"name": "edns0"}]});
    let p = pod("team-b", json!({}), json!({"dnsConfig": own}));
    let out = patched(&p, &w.review(&review_of("team-b", &p)));
    assert_eq!(out["spec"]["dnsPolicy"], "None");
    assert_eq!(
        out["spec"]["dnsConfig"],
        json!({
            "nameservers": ["169.254.20.10", KUBE_DNS, "10.0.0.53"],
            "searches": ["corp.example", "team-b.svc.cluster.local", "svc.cluster.local", "cluster.local"],
            "options": [{"name": "ndots", "value": "2"}, {"name": "attempts", "value": "2"},
                        {"name": "timeout", "value": "2"}, {"name": "edns0"}]
        })
    );
    assert_eq!(
        w.metric("nodedns_inject_patches_total", "mode=\"merge\""),
        1.0
    );
    // Two nameservers of its own would make four: left alone, with a warning for the client.
    let p = pod(
        "team-b",
        json!({}),
        json!({"dnsConfig": {"nameservers": ["10.0.0.53", "10.0.0.54"]}}),
    );
    let r = w.review(&review_of("team-b", &p));
    assert!(r["response"].get("patch").is_none(), "{r}");
    assert!(
        r["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("4 nameservers"),
        "{r}"
    );
    assert_eq!(
        w.metric("nodedns_inject_skipped_total", "reason=\"limits\""),
        1.0
    );
}

#[test]
fn own_dns_config_is_left_alone_when_told() {
    let w = Webhook::start(&["--existing-dns-config=skip"]);
    let p = pod(
        "team-b",
        json!({}),
        json!({"dnsConfig": {"searches": ["corp.example"]}}),
    );
    let r = w.review(&review_of("team-b", &p));
    assert!(r["response"].get("patch").is_none(), "{r}");
    assert_eq!(
        w.metric("nodedns_inject_skipped_total", "reason=\"has_dns_config\""),
        1.0
    );
}

#[test]
fn other_dns_policies_are_left_alone() {
    let w = Webhook::start(&[]);
    for policy in ["Default", "None"] {
        let extra = if policy == "None" {
            json!({"dnsPolicy": policy, "dnsConfig": {"nameservers": ["1.1.1.1"]}})
        } else {
            json!({"dnsPolicy": policy})
        };
        let p = pod("team-a", json!({}), extra);
        let r = w.review(&review_of("team-a", &p));
        assert!(r["response"].get("patch").is_none(), "{policy}: {r}");
    }
    assert_eq!(
        w.metric("nodedns_inject_skipped_total", "reason=\"dns_policy\""),
        2.0
    );
}

#[test]
fn excluded_namespaces_are_left_alone() {
    let w = Webhook::start(&[]);
    for ns in ["kube-system", "kube-public"] {
        let p = pod(ns, json!({}), json!({}));
        let r = w.review(&review_of(ns, &p));
        assert!(r["response"].get("patch").is_none(), "{ns}: {r}");
    }
    assert_eq!(
        w.metric(
            "nodedns_inject_skipped_total",
            "reason=\"excluded_namespace\""
        ),
        2.0
    );
    // --exclude-namespace replaces the list.
    let w = Webhook::start(&["--exclude-namespace=batch"]);
    let p = pod("batch", json!({}), json!({}));
    assert!(w.review(&review_of("batch", &p))["response"]
        .get("patch")
        .is_none());
    let p = pod("kube-public", json!({}), json!({}));
    assert!(w.review(&review_of("kube-public", &p))["response"]["patch"].is_string());
}

#[test]
fn updates_and_other_kinds_are_allowed_unchanged() {
    let w = Webhook::start(&[]);
    let p = pod("team-a", json!({}), json!({}));
    let mut r = review_of("team-a", &p);
    r["request"]["operation"] = json!("UPDATE");
    assert!(w.review(&r)["response"].get("patch").is_none());
    let mut r = review_of("team-a", &json!({"apiVersion": "v1", "kind": "ConfigMap"}));
    r["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "ConfigMap"});
    assert!(w.review(&r)["response"].get("patch").is_none());
}

#[test]
fn bad_requests_get_clear_errors_and_the_webhook_keeps_serving() {
    let mut w = Webhook::start(&["--max-body-bytes=65536"]);
    let good = review_of("team-a", &pod("team-a", json!({}), json!({})));
    let good_bytes = serde_json::to_vec(&good).unwrap();

    let (s, _, b) = w.post(b"{\"apiVersion\": \"admission.k8s.io/v1\", \"kind\": ");
    assert_eq!(s, 400);
    assert!(String::from_utf8_lossy(&b).contains("malformed AdmissionReview"));
    let (s, _, b) = w.post(b"\x00\xff\xfe not json at all");
    assert_eq!(s, 400, "{}", String::from_utf8_lossy(&b));
    let (s, _, b) =
        w.post(b"{\"apiVersion\": \"admission.k8s.io/v1\", \"kind\": \"AdmissionReview\"}");
    assert_eq!(s, 400);
    assert!(String::from_utf8_lossy(&b).contains("no request"));

    let mut v1beta1 = good.clone();
    v1beta1["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let (s, _, b) = w.post(&serde_json::to_vec(&v1beta1).unwrap());
    let b = String::from_utf8_lossy(&b).into_owned();
    assert_eq!(s, 400, "{b}");
    assert!(
        b.contains("admission.k8s.io/v1beta1") && b.contains("speaks admission.k8s.io/v1"),
        "{b}"
    );
    let mut wrong_kind = good.clone();
    wrong_kind["kind"] = json!("Pod");
    assert_eq!(w.post(&serde_json::to_vec(&wrong_kind).unwrap()).0, 400);

    let (s, _, b) = w.post_as(&good_bytes, "application/yaml");
    assert_eq!(s, 415);
    assert!(String::from_utf8_lossy(&b).contains("application/json"));
    let head = format!(
        "POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        good_bytes.len()
    );
    assert_eq!(w.request(&head, &good_bytes).0, 415, "no Content-Type");
    assert_eq!(
        w.post_as(&good_bytes, "application/json; charset=utf-8").0,
        200
    );

    // Oversized: refused from Content-Length before the body is read (the client sends the
    // headers only, so the refusal reaches it before the body would) ...
    let head = "POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
                Content-Length: 200000\r\nConnection: close\r\n\r\n";
    let (s, _, b) = w.request(head, b"");
    assert_eq!(s, 413);
    assert!(String::from_utf8_lossy(&b).contains("65536"));
    // ... and while reading a chunked body that declares no length: 65,537 bytes, one past the
    // limit, so the server has read all the client sent when it refuses.
    let mut chunked = Vec::new();
    for size in [32768usize, 32768, 1] {
        chunked.extend_from_slice(format!("{size:x}\r\n").as_bytes());
        chunked.extend_from_slice(&vec![b' '; size]);
        chunked.extend_from_slice(b"\r\n");
    }
    let head = "POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
                Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    assert_eq!(w.request(head, &chunked).0, 413);

    let get = "GET /mutate HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    assert_eq!(w.request(get, b"").0, 405);
    let other = "POST /validate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
                 Content-Length: 2\r\nConnection: close\r\n\r\n";
    assert_eq!(w.request(other, b"{}").0, 404);
    // Garbage instead of HTTP, and plain HTTP to the TLS port: the connection ends, nothing else.
    let mut tcp = std::net::TcpStream::connect(w.https).unwrap();
    std::io::Write::write_all(&mut tcp, b"GET / HTTP/1.1\r\n\r\n").unwrap();
    drop(tcp);

    // Still alive and still injecting.
    assert!(w.alive(), "{}", w.log());
    let r = w.review(&good);
    assert!(r["response"]["patch"].is_string());
    for (reason, n) in [
        ("malformed", 3.0),
        ("api_version", 2.0),
        ("content_type", 2.0),
        ("too_large", 2.0),
        ("route", 2.0),
    ] {
        assert_eq!(
            w.metric(
                "nodedns_inject_errors_total",
                &format!("reason=\"{reason}\"")
            ),
            n,
            "{reason}"
        );
    }
    assert_eq!(
        w.metric("nodedns_inject_requests_total", "code=\"400\""),
        5.0
    );
    assert_eq!(
        w.metric("nodedns_inject_requests_total", "code=\"413\""),
        2.0
    );
    // The handshake error of the plain-HTTP client is counted (it may still be in flight).
    let deadline = Instant::now() + Duration::from_secs(5);
    while w.metric("nodedns_inject_errors_total", "reason=\"tls\"") < 1.0 {
        assert!(Instant::now() < deadline, "TLS error not counted");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_renewed_certificate_is_served_without_a_restart() {
    let mut w = Webhook::start(&["--cert-reload-interval=100ms"]);
    let p = pod("team-a", json!({}), json!({}));
    let body = serde_json::to_vec(&review_of("team-a", &p)).unwrap();
    let head = format!(
        "POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let new_ca = Pki::issue(w.pki.dir.path());
    // The old CA stops working and the new one starts, once the files are re-read.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((200, _, _)) = https_request(w.https, &new_ca, &head, &body) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new certificate never served:\n{}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let old = https_request(w.https, &w.pki.ca_pem, &head, &body);
    assert!(old.is_err(), "the old certificate is still served: {old:?}");
    assert_eq!(
        w.metric("nodedns_inject_certificate_reloads_total", ""),
        1.0
    );
    // Broken files keep the current certificate.
    std::fs::write(w.pki.dir.path().join("tls.key"), "not a key").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.metric("nodedns_inject_certificate_reload_errors_total", "") < 1.0 {
        assert!(Instant::now() < deadline, "broken key not noticed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        https_request(w.https, &new_ca, &head, &body).map(|r| r.0),
        Ok(200)
    );
    assert!(w.alive());
}

#[test]
fn sigterm_turns_not_ready_then_exits_cleanly() {
    let mut w = Webhook::start(&["--shutdown-delay=1s"]);
    assert_eq!(plain_get(w.metrics, "/ready").0, 200);
    assert_eq!(plain_get(w.metrics, "/health").0, 200);
    w.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while plain_get(w.metrics, "/ready").0 != 503 {
        assert!(Instant::now() < deadline, "/ready never turned 503");
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = w.wait_exit(Duration::from_secs(10)).expect("exited");
    assert!(st.success(), "{st:?}");
}

#[test]
fn bad_flags_are_refused_naming_the_flag() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_nodedns-inject"))
            .args(args)
            .env_remove("KUBE_DNS_SERVICE_HOST")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&[]);
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("--kube-dns"), "{err}");
    let (code, err) = run(&["--kube-dns=10.96.0.10", "--local-dns=10.96.0.10"]);
    assert_eq!(code, Some(78));
    assert!(
        err.contains("--kube-dns") && err.contains("--local-dns"),
        "{err}"
    );
    let (code, err) = run(&["--kube-dns=10.96.0.10", "--existing-dns-config=maybe"]);
    assert_eq!(code, Some(78));
    assert!(err.contains("--existing-dns-config"), "{err}");
    let (code, err) = run(&["--kube-dns=10.96.0.10", "--ndots=16"]);
    assert_eq!(code, Some(78));
    assert!(err.contains("--ndots"), "{err}");
    let (code, err) = run(&["--kube-dns=not-an-ip"]);
    assert_eq!(code, Some(78));
    assert!(
        err.contains("--kube-dns") && err.contains("not-an-ip"),
        "{err}"
    );
    // A certificate that is not there stops the start, naming the file.
    let (code, err) = run(&[
        "--kube-dns=10.96.0.10",
        "--tls-cert=/nonexistent/tls.crt",
        "--listen=127.0.0.1:0",
        "--metrics=127.0.0.1:0",
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("/nonexistent/tls.crt"), "{err}");
}
