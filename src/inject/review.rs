//! The parts of `admission.k8s.io/v1` AdmissionReview and `v1` Pod the webhook reads and writes.
//!
//! Typed structs of our own with serde rather than `k8s-openapi`: the webhook reads five fields
//! of a Pod, and `k8s-openapi` has no AdmissionReview type (it lives in `kube-core`, which brings
//! kube's dependency tree). Unknown fields are ignored on input, so any Pod deserializes; the
//! fields we write keep the API's camelCase names.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The only API version this webhook speaks (the MutatingWebhookConfiguration asks for it).
pub const API_VERSION: &str = "admission.k8s.io/v1";
/// The kind of both the request and the response object.
pub const KIND: &str = "AdmissionReview";

/// An AdmissionReview as the API server sends it. `apiVersion` and `kind` are checked by the
/// server before the request is looked at.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReview {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    pub request: Option<AdmissionRequest>,
}

/// `request` of an AdmissionReview: what is being admitted.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest {
    /// Echoed in the response; the API server matches the two by it.
    pub uid: String,
    /// The kind of the object (group, version, kind).
    pub kind: GroupVersionKind,
    /// CREATE, UPDATE, DELETE or CONNECT.
    #[serde(default)]
    pub operation: String,
    /// The namespace of the object; a Pod's own `metadata.namespace` may still be empty on CREATE.
    #[serde(default)]
    pub namespace: Option<String>,
    /// The object as it would be stored; read as a Pod only when `kind` says it is one.
    #[serde(default)]
    pub object: Option<serde_json::Value>,
}

/// A group/version/kind triple (`group` is empty for the core API).
#[derive(Debug, Default, Deserialize)]
pub struct GroupVersionKind {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub kind: String,
}

impl GroupVersionKind {
    /// A core `v1` Pod.
    pub fn is_pod(&self) -> bool {
        self.group.is_empty() && self.version == "v1" && self.kind == "Pod"
    }
}

/// The fields of a Pod the rules look at.
#[derive(Debug, Default, Deserialize)]
pub struct Pod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    /// Unset means ClusterFirst (the API server's default).
    #[serde(default)]
    pub dns_policy: Option<String>,
    #[serde(default)]
    pub host_network: Option<bool>,
    #[serde(default)]
    pub dns_config: Option<PodDnsConfig>,
}

/// `spec.dnsConfig` (core/v1 PodDNSConfig).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodDnsConfig {
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub nameservers: Vec<String>,
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub searches: Vec<String>,
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub options: Vec<PodDnsConfigOption>,
}

impl PodDnsConfig {
    /// No nameserver, search domain or option: the same as no dnsConfig at all.
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty() && self.searches.is_empty() && self.options.is_empty()
    }
}

/// One resolver option (core/v1 PodDNSConfigOption): `ndots` with value `"5"`, or a bare flag
/// such as `single-request-reopen`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodDnsConfigOption {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

impl PodDnsConfigOption {
    pub fn new(name: &str, value: Option<String>) -> Self {
        Self {
            name: name.to_owned(),
            value,
        }
    }
}

/// A list given as JSON `null` reads as empty, as the API server treats it.
fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}
