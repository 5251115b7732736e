//! The JSONPatch (RFC 6902) for a decision and the AdmissionReview response that carries it.

use base64::Engine;
use serde_json::{json, Value};

use super::review::{PodDnsConfig, API_VERSION, KIND};

/// The JSONPatch that gives a pod `dnsPolicy: None` and `config`. `add` replaces a member that
/// exists (RFC 6902 §4.1), so one patch fits pods with and without these fields; `/spec` always
/// exists on a Pod.
pub fn dns_patch(config: &PodDnsConfig) -> Value {
    json!([
        {"op": "add", "path": "/spec/dnsPolicy", "value": "None"},
        {"op": "add", "path": "/spec/dnsConfig", "value": config},
    ])
}

/// An `admission.k8s.io/v1` AdmissionReview response allowing the request `uid`, with the patch
/// when there is one and the warnings for the client (kubectl prints them).
pub fn response(uid: &str, patch: Option<&Value>, warnings: &[String]) -> Value {
    let mut resp = json!({"uid": uid, "allowed": true});
    if let Some(p) = patch {
        let bytes = serde_json::to_vec(p).expect("a JSON value serializes");
        resp["patchType"] = json!("JSONPatch");
        resp["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    if !warnings.is_empty() {
        resp["warnings"] = json!(warnings);
    }
    json!({"apiVersion": API_VERSION, "kind": KIND, "response": resp})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inject::review::PodDnsConfigOption;

    fn config() -> PodDnsConfig {
        PodDnsConfig {
            nameservers: vec!["169.254.20.10".into(), "10.96.0.10".into()],
            searches: vec!["a.svc.cluster.local".into()],
            options: vec![PodDnsConfigOption::new("ndots", Some("5".into()))],
        }
    }

    #[test]
    fn response_carries_uid_and_base64_patch() {
        let p = dns_patch(&config());
        let r = response("u-1", Some(&p), &[]);
        assert_eq!(r["apiVersion"], API_VERSION);
        assert_eq!(r["kind"], KIND);
        assert_eq!(r["response"]["uid"], "u-1");
        assert_eq!(r["response"]["allowed"], true);
        assert_eq!(r["response"]["patchType"], "JSONPatch");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(r["response"]["patch"].as_str().unwrap())
            .unwrap();
        let back: Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(back, p);
        assert_eq!(back[1]["value"]["options"][0]["value"], "5");
        assert!(r["response"].get("warnings").is_none());
    }

    #[test]
    fn response_without_patch_has_no_patch_type() {
        let r = response("u-2", None, &["w".to_string()]);
        assert!(r["response"].get("patch").is_none());
        assert!(r["response"].get("patchType").is_none());
        assert_eq!(r["response"]["warnings"][0], "w");
    }

    #[test]
    fn option_without_value_serializes_without_value() {
        let c = PodDnsConfig {
            options: vec![PodDnsConfigOption::new("single-request-reopen", None)],
            ..Default::default()
        };
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v, json!({"options": [{"name": "single-request-reopen"}]}));
    }
}
