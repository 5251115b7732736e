//! The metrics of local answers, with CoreDNS's names: hosts entries and the hosts files'
//! modification time, template matches and rendering failures.

use std::time::UNIX_EPOCH;

use prometheus::{Gauge, IntCounterVec, IntGaugeVec, Opts, Registry};

use super::LocalAnswers;

pub struct LocalMetrics {
    /// `coredns_hosts_entries{hostsfile}`: entries per hosts file ("" for inline entries only).
    hosts_entries: IntGaugeVec,
    /// `coredns_hosts_reload_timestamp_seconds`: modification time of the newest hosts file read.
    hosts_reload: Gauge,
    /// `coredns_template_matches_total{zone,class,type}`.
    matches: IntCounterVec,
    /// `coredns_template_template_failures_total{zone,class,type,section}`: a placeholder that
    /// could not be filled (a `{{ index .Match N }}` past the matching expression's groups).
    failures: IntCounterVec,
    /// `coredns_template_rr_failures_total{zone,class,type,section}`: a rendered text that is
    /// not a record.
    rr_failures: IntCounterVec,
}

impl LocalMetrics {
    pub fn register(registry: &Registry) -> LocalMetrics {
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone())).expect("unique metric");
            c
        }
        let counters = |name: &str, help: &str, labels: &[&str]| {
            reg(
                registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let sections = ["zone", "class", "type", "section"];
        LocalMetrics {
            hosts_entries: reg(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "coredns_hosts_entries",
                        "The combined number of entries in hosts and Corefile.",
                    ),
                    &["hostsfile"],
                )
                .expect("valid metric"),
            ),
            hosts_reload: reg(
                registry,
                Gauge::new(
                    "coredns_hosts_reload_timestamp_seconds",
                    "The timestamp of the last reload of hosts file.",
                )
                .expect("valid metric"),
            ),
            matches: counters(
                "coredns_template_matches_total",
                "Counter of template regex matches.",
                &["zone", "class", "type"],
            ),
            failures: counters(
                "coredns_template_template_failures_total",
                "Counter of go template failures.",
                &sections,
            ),
            rr_failures: counters(
                "coredns_template_rr_failures_total",
                "Counter of mis-templated RRs.",
                &sections,
            ),
        }
    }

    /// Shows the hosts entries of `local` (at start, and after a reload built a new one).
    pub fn observe(&self, local: &LocalAnswers) {
        self.hosts_entries.reset();
        let mut newest = None;
        for (file, entries, mtime) in local.hosts_sources() {
            self.hosts_entries
                .with_label_values(&[file.as_str()])
                .add(entries as i64);
            newest = newest.max(mtime);
        }
        if let Some(t) = newest.and_then(|t| t.duration_since(UNIX_EPOCH).ok()) {
            self.hosts_reload.set(t.as_secs_f64());
        }
    }

    pub(crate) fn matched(&self, zone: &str, class: &str, qtype: &str) {
        self.matches.with_label_values(&[zone, class, qtype]).inc();
    }

    pub(crate) fn failed(&self, zone: &str, class: &str, qtype: &str, section: &str, rr: bool) {
        let v = if rr {
            &self.rr_failures
        } else {
            &self.failures
        };
        v.with_label_values(&[zone, class, qtype, section]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::config::HostsSection;

    #[test]
    fn hosts_entries_are_shown_per_file() {
        let registry = Registry::new();
        let m = LocalMetrics::register(&registry);
        let s = HostsSection {
            entries: vec!["192.0.2.1 a b".into(), "2001:db8::1 a".into()],
            ..HostsSection::default()
        };
        let local = LocalAnswers::build(&[s], &[], &[]).unwrap();
        m.observe(&local);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        assert!(
            text.contains("coredns_hosts_entries{hostsfile=\"\"} 3"),
            "{text}"
        );
        m.matched(".", "IN", "A");
        m.failed(".", "IN", "A", "answer", true);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        assert!(
            text.contains("coredns_template_matches_total{class=\"IN\",type=\"A\",zone=\".\"} 1")
        );
        assert!(text.contains("coredns_template_rr_failures_total{"));
    }
}
