//! Which pods get the node-local DNS config, and what it is.
//!
//! A pod is injected when kubelet would otherwise point it at the cluster DNS: `dnsPolicy`
//! `ClusterFirst` (or unset) without `hostNetwork`, or `ClusterFirstWithHostNet` (kubelet gives
//! a pod with that policy the cluster DNS with or without `hostNetwork`). It then gets
//! `dnsPolicy: None` and a `dnsConfig` equal to what kubelet would have written, except for the
//! nameservers: the node-local address first and the kube-dns Service IP second, so a resolver
//! that cannot reach the node-local cache falls back to CoreDNS.
//!
//! The namespace's opt-in label is evaluated by the API server (the webhook configuration's
//! `namespaceSelector`): a request reaching us is from an opted-in namespace. Everything else is
//! decided here, so a request sent despite the selectors is still handled by the same rules.

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::review::{Pod, PodDnsConfig, PodDnsConfigOption};

/// The pod label (and namespace label) this webhook is steered by.
pub const LABEL: &str = "node-local-dns-injection";
/// The pod label value that opts a pod out.
pub const OPT_OUT: &str = "disabled";

/// Kubernetes' limits for a pod's DNS config (`pkg/apis/core/validation`): at most three
/// nameservers, 32 search domains, 2048 characters of search list. A merge past them would make
/// the API server refuse the pod, so such a pod is left alone instead.
pub const MAX_NAMESERVERS: usize = 3;
pub const MAX_SEARCHES: usize = 32;
pub const MAX_SEARCH_CHARS: usize = 2048;

/// What to do with a pod that brings its own `dnsConfig`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExistingDnsConfig {
    /// Merge it the way kubelet merges a dnsConfig into the policy's config (see [`merge`]).
    Merge,
    /// Leave such a pod alone.
    Skip,
}

/// The configured rules (from `inject::config`).
#[derive(Debug, Clone)]
pub struct Rules {
    /// The node-local cache's address (the link-local listen address of the DaemonSet).
    pub local_dns: IpAddr,
    /// The kube-dns Service's ClusterIP, listed second as the fallback.
    pub kube_dns: IpAddr,
    /// The cluster domain, without a trailing dot.
    pub cluster_domain: String,
    /// Search domains after the cluster ones (kubelet appends the node's; we cannot see them).
    pub extra_searches: Vec<String>,
    /// Resolver options, in order (`ndots`, `attempts`, `timeout`, ...).
    pub options: Vec<PodDnsConfigOption>,
    /// Namespaces never injected, whatever their labels.
    pub excluded_namespaces: BTreeSet<String>,
    pub existing: ExistingDnsConfig,
}

/// Why a pod is left unchanged; the label values of `nodedns_inject_skipped_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Not a CREATE (a pod's DNS settings cannot change after creation).
    Operation,
    /// Not a core v1 Pod.
    NotAPod,
    /// No namespace in the request or the pod: no search list can be built.
    NoNamespace,
    ExcludedNamespace,
    OptedOut,
    /// A policy that does not use the cluster DNS (Default, None, ClusterFirst + hostNetwork).
    Policy,
    /// The pod has its own dnsConfig and the rules say to leave such pods alone.
    HasDnsConfig,
    /// Merging the pod's dnsConfig would break a Kubernetes limit.
    Limits,
}

impl Skip {
    pub const ALL: [Skip; 8] = [
        Skip::Operation,
        Skip::NotAPod,
        Skip::NoNamespace,
        Skip::ExcludedNamespace,
        Skip::OptedOut,
        Skip::Policy,
        Skip::HasDnsConfig,
        Skip::Limits,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Skip::Operation => "operation",
            Skip::NotAPod => "not_a_pod",
            Skip::NoNamespace => "no_namespace",
            Skip::ExcludedNamespace => "excluded_namespace",
            Skip::OptedOut => "opted_out",
            Skip::Policy => "dns_policy",
            Skip::HasDnsConfig => "has_dns_config",
            Skip::Limits => "limits",
        }
    }
}

/// The outcome for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Set `dnsPolicy: None` and this `dnsConfig`. `merged`: the pod had a dnsConfig of its own,
    /// merged into ours.
    Inject { config: PodDnsConfig, merged: bool },
    /// Leave the pod unchanged; `warning` is returned to the client when there is one.
    Skip {
        reason: Skip,
        warning: Option<String>,
    },
}

impl Decision {
    fn skip(reason: Skip) -> Self {
        Decision::Skip {
            reason,
            warning: None,
        }
    }
}

impl Rules {
    /// The search list kubelet gives a ClusterFirst pod in `namespace`, then the extra domains.
    pub fn searches(&self, namespace: &str) -> Vec<String> {
        let d = &self.cluster_domain;
        let mut s = vec![
            format!("{namespace}.svc.{d}"),
            format!("svc.{d}"),
            d.clone(),
        ];
        s.extend(self.extra_searches.iter().cloned());
        s
    }

    /// The dnsConfig an injected pod without a dnsConfig of its own gets.
    pub fn base_config(&self, namespace: &str) -> PodDnsConfig {
        PodDnsConfig {
            nameservers: vec![self.local_dns.to_string(), self.kube_dns.to_string()],
            searches: self.searches(namespace),
            options: self.options.clone(),
        }
    }

    /// Decides for a pod being admitted. `namespace` is the request's namespace (a pod's own
    /// `metadata.namespace` is used when the request has none).
    pub fn decide(&self, namespace: Option<&str>, pod: &Pod) -> Decision {
        let ns = namespace.filter(|n| !n.is_empty()).or(pod
            .metadata
            .namespace
            .as_deref()
            .filter(|n| !n.is_empty()));
        let Some(ns) = ns else {
            return Decision::skip(Skip::NoNamespace);
        };
        if self.excluded_namespaces.contains(ns) {
            return Decision::skip(Skip::ExcludedNamespace);
        }
        let labels = pod.metadata.labels.as_ref();
        if labels.and_then(|l| l.get(LABEL)).map(String::as_str) == Some(OPT_OUT) {
            return Decision::skip(Skip::OptedOut);
        }
        if !uses_cluster_dns(pod) {
            return Decision::skip(Skip::Policy);
        }
        let base = self.base_config(ns);
        match pod.spec.dns_config.as_ref().filter(|c| !c.is_empty()) {
            None => Decision::Inject {
                config: base,
                merged: false,
            },
            Some(_) if self.existing == ExistingDnsConfig::Skip => {
                Decision::skip(Skip::HasDnsConfig)
            }
            Some(own) => {
                let config = merge(base, own);
                match check_limits(&config) {
                    Ok(()) => Decision::Inject {
                        config,
                        merged: true,
                    },
                    Err(why) => Decision::Skip {
                        reason: Skip::Limits,
                        warning: Some(format!(
                            "nodedns-inject: pod DNS config left unchanged: with the node-local \
                             cache added, {why}"
                        )),
                    },
                }
            }
        }
    }
}

/// Whether kubelet would give this pod the cluster DNS (kubelet's `getPodDNSType`):
/// ClusterFirstWithHostNet always, ClusterFirst (the default) only without hostNetwork.
pub fn uses_cluster_dns(pod: &Pod) -> bool {
    let host_network = pod.spec.host_network.unwrap_or(false);
    match pod.spec.dns_policy.as_deref().unwrap_or("ClusterFirst") {
        "ClusterFirstWithHostNet" => true,
        "ClusterFirst" => !host_network,
        _ => false,
    }
}

/// Merges a pod's own dnsConfig into the injected one as kubelet merges a dnsConfig into the
/// config of the pod's policy (`appendDNSConfig`): nameservers ours first, then the pod's;
/// search domains the pod's first, then ours; options ours, each replaced by the pod's option of
/// the same name, then the pod's other options. Duplicates are dropped, first one kept.
pub fn merge(base: PodDnsConfig, own: &PodDnsConfig) -> PodDnsConfig {
    let nameservers = dedup(base.nameservers.iter().chain(&own.nameservers));
    let searches = dedup(own.searches.iter().chain(&base.searches));
    let mut options: Vec<PodDnsConfigOption> = Vec::new();
    for o in base.options.iter().chain(&own.options) {
        match options.iter_mut().find(|x| x.name == o.name) {
            Some(x) => x.value.clone_from(&o.value),
            None => options.push(o.clone()),
        }
    }
    PodDnsConfig {
        nameservers,
        searches,
        options,
    }
}

fn dedup<'a>(items: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for i in items {
        if !out.contains(i) {
            out.push(i.clone());
        }
    }
    out
}

/// The API server's limits on a `dnsPolicy: None` dnsConfig.
pub fn check_limits(c: &PodDnsConfig) -> Result<(), String> {
    if c.nameservers.len() > MAX_NAMESERVERS {
        return Err(format!(
            "the pod would have {} nameservers (at most {MAX_NAMESERVERS})",
            c.nameservers.len()
        ));
    }
    if c.searches.len() > MAX_SEARCHES {
        return Err(format!(
            "the pod would have {} search domains (at most {MAX_SEARCHES})",
            c.searches.len()
        ));
    }
    let chars =
        c.searches.iter().map(String::len).sum::<usize>() + c.searches.len().saturating_sub(1);
    if chars > MAX_SEARCH_CHARS {
        return Err(format!(
            "the search list would be {chars} characters long (at most {MAX_SEARCH_CHARS})"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inject::review::{ObjectMeta, PodSpec};

    fn rules() -> Rules {
        Rules {
            local_dns: "169.254.20.10".parse().unwrap(),
            kube_dns: "10.96.0.10".parse().unwrap(),
            cluster_domain: "cluster.local".into(),
            extra_searches: vec![],
            options: vec![PodDnsConfigOption::new("ndots", Some("5".into()))],
            excluded_namespaces: ["kube-system", "kube-public"].map(String::from).into(),
            existing: ExistingDnsConfig::Merge,
        }
    }

    fn pod(policy: Option<&str>, host_network: bool) -> Pod {
        Pod {
            metadata: ObjectMeta::default(),
            spec: PodSpec {
                dns_policy: policy.map(String::from),
                host_network: Some(host_network),
                dns_config: None,
            },
        }
    }

    fn injected(d: &Decision) -> &PodDnsConfig {
        match d {
            Decision::Inject { config, .. } => config,
            other => panic!("not injected: {other:?}"),
        }
    }

    fn skipped(d: &Decision) -> Skip {
        match d {
            Decision::Skip { reason, .. } => *reason,
            other => panic!("injected: {other:?}"),
        }
    }

    #[test]
    fn cluster_first_gets_local_then_kube_dns_and_the_namespace_search_list() {
        let d = rules().decide(Some("shop"), &pod(Some("ClusterFirst"), false));
        let c = injected(&d);
        assert_eq!(c.nameservers, ["169.254.20.10", "10.96.0.10"]);
        assert_eq!(
            c.searches,
            [
                "shop.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local"
            ]
        );
        assert_eq!(c.options, rules().options);
        // An unset policy is ClusterFirst.
        assert_eq!(rules().decide(Some("shop"), &pod(None, false)), d);
    }

    #[test]
    fn policies_follow_kubelet() {
        let r = rules();
        let cases = [
            (Some("ClusterFirst"), false, true),
            (Some("ClusterFirst"), true, false),
            (Some("ClusterFirstWithHostNet"), true, true),
            (Some("ClusterFirstWithHostNet"), false, true),
            (Some("Default"), false, false),
            (Some("Default"), true, false),
            (Some("None"), false, false),
            (Some("SomethingNew"), false, false),
            (None, true, false),
        ];
        for (policy, host, inject) in cases {
            let d = r.decide(Some("a"), &pod(policy, host));
            if inject {
                injected(&d);
            } else {
                assert_eq!(skipped(&d), Skip::Policy, "{policy:?} host={host}");
            }
        }
    }

    #[test]
    fn excluded_namespace_and_opt_out_label() {
        let r = rules();
        let p = pod(None, false);
        assert_eq!(
            skipped(&r.decide(Some("kube-system"), &p)),
            Skip::ExcludedNamespace
        );
        assert_eq!(
            skipped(&r.decide(Some("kube-public"), &p)),
            Skip::ExcludedNamespace
        );
        assert_eq!(skipped(&r.decide(None, &p)), Skip::NoNamespace);
        assert_eq!(skipped(&r.decide(Some(""), &p)), Skip::NoNamespace);
        let mut p = pod(None, false);
        p.metadata.namespace = Some("from-pod".into());
        let c = injected(&r.decide(None, &p)).clone();
        assert_eq!(c.searches[0], "from-pod.svc.cluster.local");
        // The request's namespace wins over the pod's own.
        let c = injected(&r.decide(Some("req"), &p)).clone();
        assert_eq!(c.searches[0], "req.svc.cluster.local");
        p.metadata.labels = Some([(LABEL.to_string(), "disabled".to_string())].into());
        assert_eq!(skipped(&r.decide(Some("req"), &p)), Skip::OptedOut);
        p.metadata.labels = Some([(LABEL.to_string(), "Disabled".to_string())].into());
        injected(&r.decide(Some("req"), &p));
    }

    #[test]
    fn merge_follows_kubelet_order_and_drops_duplicates() {
        let base = rules().base_config("ns");
        let own = PodDnsConfig {
            nameservers: vec!["10.96.0.10".into(), "10.0.0.53".into()],
            searches: vec!["corp.example".into(), "svc.cluster.local".into()],
            options: vec![
                PodDnsConfigOption::new("ndots", Some("2".into())),
                PodDnsConfigOption::new("edns0", None),
            ],
        };
        let m = merge(base, &own);
        assert_eq!(m.nameservers, ["169.254.20.10", "10.96.0.10", "10.0.0.53"]);
        assert_eq!(
            m.searches,
            [
                "corp.example",
                "svc.cluster.local",
                "ns.svc.cluster.local",
                "cluster.local"
            ]
        );
        assert_eq!(
            m.options,
            [
                PodDnsConfigOption::new("ndots", Some("2".into())),
                PodDnsConfigOption::new("edns0", None)
            ]
        );
    }

    #[test]
    fn own_dns_config_merged_skipped_or_refused_past_the_limits() {
        let mut r = rules();
        let mut p = pod(None, false);
        p.spec.dns_config = Some(PodDnsConfig {
            searches: vec!["corp.example".into()],
            ..Default::default()
        });
        match r.decide(Some("a"), &p) {
            Decision::Inject { merged, config } => {
                assert!(merged);
                assert_eq!(config.searches[0], "corp.example");
            }
            d => panic!("{d:?}"),
        }
        // An empty dnsConfig is no dnsConfig.
        let mut empty = pod(None, false);
        empty.spec.dns_config = Some(PodDnsConfig::default());
        assert!(matches!(
            r.decide(Some("a"), &empty),
            Decision::Inject { merged: false, .. }
        ));
        p.spec.dns_config = Some(PodDnsConfig {
            nameservers: vec!["10.0.0.1".into(), "10.0.0.2".into()],
            ..Default::default()
        });
        match r.decide(Some("a"), &p) {
            Decision::Skip {
                reason: Skip::Limits,
                warning: Some(w),
            } => assert!(w.contains("4 nameservers"), "{w}"),
            d => panic!("{d:?}"),
        }
        p.spec.dns_config = Some(PodDnsConfig {
            searches: (0..30).map(|i| format!("d{i}.example")).collect(),
            ..Default::default()
        });
        assert_eq!(skipped(&r.decide(Some("a"), &p)), Skip::Limits);
        r.existing = ExistingDnsConfig::Skip;
        p.spec.dns_config = Some(PodDnsConfig {
            searches: vec!["corp.example".into()],
            ..Default::default()
        });
        assert_eq!(skipped(&r.decide(Some("a"), &p)), Skip::HasDnsConfig);
    }

    #[test]
    fn search_list_length_limit_counts_characters() {
        let long = "x".repeat(60);
        let c = PodDnsConfig {
            searches: (0..20).map(|i| format!("{long}.{long}.d{i}")).collect(),
            ..Default::default()
        };
        let e = check_limits(&c).unwrap_err();
        assert!(e.contains("characters"), "{e}");
        let c = PodDnsConfig {
            nameservers: vec!["a".into(), "b".into(), "c".into()],
            searches: vec!["x".into()],
            ..Default::default()
        };
        assert!(check_limits(&c).is_ok());
    }

    #[test]
    fn pods_deserialize_from_api_json_including_nulls() {
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "labels": null, "annotations": {"a": "b"}},
            "spec": {"containers": [], "dnsPolicy": "ClusterFirst",
                     "dnsConfig": {"nameservers": null, "searches": ["s"],
                                   "options": [{"name": "ndots", "value": "1"}]}}
        }))
        .unwrap();
        let c = p.spec.dns_config.unwrap();
        assert!(c.nameservers.is_empty());
        assert_eq!(c.searches, ["s"]);
        assert_eq!(c.options[0].value.as_deref(), Some("1"));
    }
}
