//! The webhook test harness: a test CA, the running `nodedns-inject`, an HTTPS client trusting
//! the CA, and AdmissionReviews of the Kubernetes API reference's shape.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{capture_stderr, find_addr};
use base64::Engine;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const KUBE_DNS: &str = "10.96.0.10";

/// A test CA and a serving certificate it signed for `localhost`.
pub struct Pki {
    pub ca_pem: String,
    pub dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_pem = Self::issue(dir.path());
        Pki { ca_pem, dir }
    }

    /// Writes tls.crt/tls.key under `dir` from a new CA; returns that CA's PEM.
    pub fn issue(dir: &Path) -> String {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "nodedns-inject test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        // Written to a temporary name and renamed, as kubelet swaps a Secret volume's files.
        std::fs::write(dir.join("tls.key.new"), key.serialize_pem()).unwrap();
        std::fs::write(dir.join("tls.crt.new"), leaf.pem()).unwrap();
        std::fs::rename(dir.join("tls.key.new"), dir.join("tls.key")).unwrap();
        std::fs::rename(dir.join("tls.crt.new"), dir.join("tls.crt")).unwrap();
        ca.pem()
    }

    fn cert(&self) -> String {
        self.dir.path().join("tls.crt").display().to_string()
    }

    fn key(&self) -> String {
        self.dir.path().join("tls.key").display().to_string()
    }
}

/// A running `nodedns-inject`; killed on drop, its log printed if the test failed.
pub struct Webhook {
    pub child: Child,
    pub https: SocketAddr,
    pub metrics: SocketAddr,
    log: Arc<Mutex<String>>,
    pub pki: Pki,
}

impl Webhook {
    pub fn start(extra: &[&str]) -> Webhook {
        let pki = Pki::new();
        let (cert, key) = (pki.cert(), pki.key());
        let mut args = vec![
            "--listen=127.0.0.1:0",
            "--metrics=127.0.0.1:0",
            "--kube-dns",
            KUBE_DNS,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ];
        args.extend_from_slice(extra);
        if !extra.iter().any(|a| a.starts_with("--shutdown-delay")) {
            args.push("--shutdown-delay=200ms");
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_nodedns-inject"))
            .args(&args)
            .env("RUST_LOG", "debug")
            .env_remove("KUBE_DNS_SERVICE_HOST")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nodedns-inject");
        let (log, rx) = capture_stderr(&mut child);
        let (mut https, mut metrics) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(20);
        while https.is_none() || metrics.is_none() {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    https = https.or(find_addr(&line, "listening for HTTPS on "));
                    metrics = metrics.or(find_addr(&line, "serving metrics on "));
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("nodedns-inject did not start:\n{}", log.lock().unwrap());
                }
            }
        }
        let w = Webhook {
            child,
            https: https.unwrap(),
            metrics: metrics.unwrap(),
            log,
            pki,
        };
        // Ready once both listeners are bound and the certificate is loaded.
        let deadline = Instant::now() + Duration::from_secs(10);
        while plain_get(w.metrics, "/ready").0 != 200 {
            assert!(Instant::now() < deadline, "never ready:\n{}", w.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        w
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// One HTTPS request (Connection: close) trusting the test CA; (status, headers, body).
    pub fn request(&self, raw_head: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
        https_request(self.https, &self.pki.ca_pem, raw_head, body).expect("HTTPS exchange")
    }

    /// POSTs `body` to /mutate as application/json.
    pub fn post(&self, body: &[u8]) -> (u16, String, Vec<u8>) {
        self.post_as(body, "application/json")
    }

    pub fn post_as(&self, body: &[u8], content_type: &str) -> (u16, String, Vec<u8>) {
        let head = format!(
            "POST /mutate?timeout=2s HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        self.request(&head, body)
    }

    /// Sends a review, expects 200 and an allowed response with the same uid.
    pub fn review(&self, review: &Value) -> Value {
        let (status, _, body) = self.post(&serde_json::to_vec(review).unwrap());
        let text = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(status, 200, "{text}\n{}", self.log());
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(v["kind"], "AdmissionReview");
        assert_eq!(v["response"]["uid"], review["request"]["uid"]);
        assert_eq!(v["response"]["allowed"], true);
        v
    }

    pub fn metric(&self, name: &str, label: &str) -> f64 {
        let (_, body) = plain_get(self.metrics, "/metrics");
        let want = if label.is_empty() {
            format!("{name} ")
        } else {
            format!("{name}{{{label}}} ")
        };
        body.lines()
            .find_map(|l| l.strip_prefix(&want))
            .unwrap_or_else(|| panic!("{want} not in /metrics:\n{body}"))
            .trim()
            .parse()
            .unwrap()
    }

    pub fn signal(&self, sig: i32) {
        crate::common::signal_child(&self.child, sig);
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        crate::common::wait_child(&mut self.child, timeout)
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- nodedns-inject log ----\n{}", self.log());
        }
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A TLS client trusting only `ca_pem`; sends `head` + `body`, reads to EOF.
pub fn https_request(
    addr: SocketAddr,
    ca_pem: &str,
    head: &str,
    body: &[u8],
) -> Result<(u16, String, Vec<u8>), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    rt().block_on(async {
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| e.to_string())?;
            let name = ServerName::try_from("localhost").unwrap();
            let mut tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            tls.write_all(head.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            // A server that refuses early may close before the whole body is written.
            let _ = tls.write_all(body).await;
            let _ = tls.flush().await;
            let mut raw = Vec::new();
            let _ = tls.read_to_end(&mut raw).await;
            Ok::<_, String>(raw)
        };
        let raw = tokio::time::timeout(Duration::from_secs(15), exchange)
            .await
            .map_err(|_| "timed out".to_string())??;
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| format!("no HTTP response: {:?}", String::from_utf8_lossy(&raw)))?;
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line: {head}"))?;
        Ok((status, head, raw[split + 4..].to_vec()))
    })
}

/// GET over plain HTTP on the metrics port.
pub fn plain_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (status, body.to_string())
}

/// A Pod as a controller creates it (after the API server's defaulting).
pub fn pod(namespace: &str, labels: Value, spec_extra: Value) -> Value {
    let mut spec = json!({
        "containers": [{"name": "app", "image": "registry.example/app:1.0",
                        "resources": {}, "terminationMessagePath": "/dev/termination-log",
                        "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"}],
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 30,
        "dnsPolicy": "ClusterFirst",
        "serviceAccountName": "default",
        "securityContext": {},
        "schedulerName": "default-scheduler",
        "enableServiceLinks": true,
        "preemptionPolicy": "PreemptLowerPriority",
        "priority": 0
    });
    for (k, v) in spec_extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "app-7d9c5b8f6d-", "namespace": namespace,
                     "labels": labels, "ownerReferences": [{"apiVersion": "apps/v1",
                     "kind": "ReplicaSet", "name": "app-7d9c5b8f6d",
                     "uid": "4f0e3a4e-1c2b-4d5e-8f90-123456789abc", "controller": true,
                     "blockOwnerDeletion": true}]},
        "spec": spec,
        "status": {}
    })
}

/// An admission.k8s.io/v1 AdmissionReview for creating `pod` in `namespace`.
pub fn review_of(namespace: &str, pod: &Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": format!("705ab4f5-6393-11e8-b7cc-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                         "uid": "1b5a0d5c-8c1e-4d6f-9a55-0d1b7c3f2e10",
                         "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system",
                                    "system:authenticated"]},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

/// The pod after the response's patch (unchanged when there is none).
pub fn patched(pod: &Value, response: &Value) -> Value {
    let mut out = pod.clone();
    if let Some(p) = response["response"]["patch"].as_str() {
        assert_eq!(response["response"]["patchType"], "JSONPatch");
        let raw = base64::engine::general_purpose::STANDARD.decode(p).unwrap();
        let ops: json_patch::Patch = serde_json::from_slice(&raw).unwrap();
        json_patch::patch(&mut out, &ops).unwrap();
    }
    out
}
