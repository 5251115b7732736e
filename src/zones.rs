//! Where a name goes: the forwarding zones, most specific first, and the one routing decision
//! (longest suffix match). A miss is routed once, where it leaves the hit path, and carries its
//! zone (and cache key) from there on.

use std::net::SocketAddr;
use std::ops::Deref;
use std::time::Duration;

use crate::config::Transport;
use crate::dns;

/// One forwarding zone after validation.
#[derive(Debug, Clone)]
pub struct Zone {
    /// Presentation form, e.g. "cluster.local." or ".".
    pub name: String,
    /// Lowercased wire form.
    pub wire: Vec<u8>,
    pub upstreams: Vec<SocketAddr>,
    pub transport: Transport,
    pub success_max_ttl: Duration,
    pub denial_max_ttl: Duration,
    /// How long past their TTL the zone's answers may be served stale (zero: never).
    pub stale_window: Duration,
    /// The zone's place in the metrics' `zone` dimension and in cache entries. A zone keeps its
    /// slot across reloads (the table's order may change); the table gives each zone its index
    /// until the metrics assign slots (`Metrics::assign_zone_slots`).
    pub slot: u16,
}

/// A routing decision: the zone's index in the zone table of configuration generation `gen`.
/// A query routed just before a reload is routed again in the new table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub zone: usize,
    pub gen: u64,
}

/// The zones, ordered most specific first; the last is always the root zone ".".
#[derive(Debug, Clone)]
pub struct ZoneTable(Vec<Zone>);

impl ZoneTable {
    /// Orders `zones` most specific first, so the first zone containing a name is its longest
    /// suffix match. `zones` must hold the root zone.
    pub fn new(mut zones: Vec<Zone>) -> ZoneTable {
        debug_assert!(zones.iter().any(|z| z.wire == [0]));
        zones.sort_by_key(|z| std::cmp::Reverse(z.wire.len()));
        for (i, z) in zones.iter_mut().enumerate() {
            z.slot = i as u16;
        }
        ZoneTable(zones)
    }

    /// The index of the zone a lowercased wire name routes to.
    pub fn route(&self, qname: &[u8]) -> usize {
        self.0
            .iter()
            .position(|z| dns::name_in_zone(qname, &z.wire))
            .unwrap_or(self.0.len() - 1)
    }
}

impl std::ops::DerefMut for ZoneTable {
    fn deref_mut(&mut self) -> &mut [Zone] {
        &mut self.0
    }
}

impl Deref for ZoneTable {
    type Target = [Zone];
    fn deref(&self) -> &[Zone] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(name: &str) -> Zone {
        Zone {
            name: name.into(),
            wire: dns::name_from_str(name).unwrap(),
            upstreams: vec![],
            transport: Transport::PreferUdp,
            success_max_ttl: Duration::ZERO,
            denial_max_ttl: Duration::ZERO,
            stale_window: Duration::ZERO,
            slot: 0,
        }
    }

    #[test]
    fn the_longest_suffix_wins_and_the_root_takes_the_rest() {
        let t = ZoneTable::new(vec![
            zone("."),
            zone("corp.example"),
            zone("a.corp.example"),
        ]);
        let route = |n: &str| t[t.route(&dns::name_from_str(n).unwrap())].name.clone();
        assert_eq!(route("x.a.corp.example"), "a.corp.example");
        assert_eq!(route("b.corp.example"), "corp.example");
        assert_eq!(route("xcorp.example"), ".");
        assert_eq!(route("example.org"), ".");
    }
}
