//! Node setup: link-local interface and conntrack-bypass firewall rules.
//!
//! What node-cache does on a node, done by [`NodeManager`]:
//! 1. [`NodeManager::setup_interface`] before the listeners bind: a `dummy` link (default
//!    `nodelocaldns`) holding every listen IP as /32 or /128, or, where the kernel has no dummy
//!    link type, an existing link named by the operator (e.g. `lo`).
//! 2. [`NodeManager::setup_rules`] once the listeners answer: NOTRACK/ACCEPT rules for DNS and the
//!    health port, through iptables (nf_tables or legacy, detected) or one nftables table, and
//!    the fail-open redirect (nftables in either case). NOTRACK in raw PREROUTING applies only
//!    while a nodedns socket listens, so a node whose nodedns is gone still answers pods through
//!    CoreDNS. Leftovers are adopted: node-cache's rules and stale rules of ours are removed
//!    first, rules already in place are kept.
//! 3. [`NodeManager::run_sync_loop`]: every `sync_interval` put back whatever went missing.
//! 4. [`NodeManager::teardown`] on exit: rules first, then the addresses / our link.

mod exec;
mod failopen;
mod iptables;
mod link;
mod nft;
mod rules;
mod settings;

use std::collections::HashSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::anyhow;
use tracing::{debug, error, info, warn};

use self::failopen::{FailOpen, Plan};
use self::iptables::{IptError, Iptables};
use self::link::LinkError;
use self::nft::Nft;
use self::rules::Rule;

pub(crate) use self::failopen::is_node_local;
pub use self::link::{ADDR_PROTO, LINK_ALIAS};
pub use self::nft::{FAMILY as NFT_FAMILY, TABLE as NFT_TABLE};
pub use self::rules::COMMENT_PREFIX;
pub use self::settings::{Firewall, NodeConfig};

/// Rounds of rule removal at teardown while the xtables lock stays busy (each waits 5 s).
const TEARDOWN_LOCK_ATTEMPTS: u32 = 3;

/// Counts setup failures; the metrics type implements it as
/// coredns_nodecache_setup_errors_total{errortype} with errortype one of
/// "iptables", "iptables_lock", "interface_add", "interface_check", "configmap".
///
/// This module reports "interface_add" (creating the link, or populating one it just created),
/// "interface_check" (inspecting the link or restoring addresses on an existing one),
/// "iptables_lock" (the xtables lock wait ran out) and "iptables" (any other firewall failure,
/// nftables included).
pub trait SetupErrorSink: Send + Sync + 'static {
    fn setup_error(&self, errortype: &'static str);
}

#[derive(Default)]
struct State {
    /// setup_interface ran: sync keeps the link and addresses in place.
    interface_wanted: bool,
    /// This process created the link.
    created_link: bool,
    /// Addresses this process added.
    added: HashSet<IpAddr>,
    /// setup_rules ran: sync keeps the rules in place.
    rules_wanted: bool,
    iptables: Option<Iptables>,
    /// `nft list table` right after our last apply, to notice changes.
    nft_applied: Option<String>,
    /// node-cache's rules and stale rules of ours are gone (done once, retried by sync).
    leftovers_removed: bool,
    torn_down: bool,
}

/// Sets up, keeps up and tears down the node's interface and firewall rules.
pub struct NodeManager {
    cfg: NodeConfig,
    errors: Arc<dyn SetupErrorSink>,
    rules: Vec<Rule>,
    /// The fail-open redirects (one per family at most), and the targets without one.
    failopen: Plan,
    /// IPs to hold on the link: listen IPs except unspecified and loopback ones.
    link_ips: Vec<IpAddr>,
    state: tokio::sync::Mutex<State>,
}

impl NodeManager {
    pub fn new(cfg: NodeConfig, errors: Arc<dyn SetupErrorSink>) -> Self {
        let rules = rules::build(&cfg.listen, cfg.health_port);
        let failopen = failopen::plan(&cfg.listen, &cfg.fail_open_to);
        let link_ips = rules::listen_ips(&cfg.listen)
            .into_iter()
            .filter(|ip| !ip.is_loopback())
            .collect();
        NodeManager {
            cfg,
            errors,
            rules,
            failopen,
            link_ips,
            state: tokio::sync::Mutex::new(State::default()),
        }
    }

    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// Before listeners bind: ensure the interface and addresses (no-op unless setup_interface).
    pub async fn setup_interface(&self) -> anyhow::Result<()> {
        if !self.cfg.setup_interface {
            return Ok(());
        }
        let mut st = self.state.lock().await;
        if st.torn_down {
            return Err(anyhow!("node setup already torn down"));
        }
        st.interface_wanted = true;
        self.ensure_interface(&mut st, false).await
    }

    /// After listeners are bound and answering: install rules (no-op unless setup_iptables).
    pub async fn setup_rules(&self) -> anyhow::Result<()> {
        if !self.cfg.setup_iptables {
            return Ok(());
        }
        let mut st = self.state.lock().await;
        if st.torn_down {
            return Err(anyhow!("node setup already torn down"));
        }
        st.rules_wanted = true;
        self.ensure_rules(&mut st, false).await
    }

    /// One re-check: put back missing link/addresses/rules, log what was restored, count failures.
    pub async fn sync(&self) -> anyhow::Result<()> {
        let mut st = self.state.lock().await;
        if st.torn_down {
            return Ok(());
        }
        let mut errs = Vec::new();
        if st.interface_wanted {
            if let Err(e) = self.ensure_interface(&mut st, true).await {
                errs.push(e);
            }
        }
        if st.rules_wanted {
            if let Err(e) = self.ensure_rules(&mut st, true).await {
                errs.push(e);
            }
        }
        combine(errs)
    }

    /// Runs sync every sync_interval until `shutdown` completes (e.g.
    /// `async move { let _ = rx.wait_for(|s| *s).await; }` on a `watch::Receiver<bool>`).
    /// A sync in progress is abandoned when shutdown comes.
    pub async fn run_sync_loop(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let period = self.cfg.sync_interval;
        if period.is_zero() || !(self.cfg.setup_interface || self.cfg.setup_iptables) {
            shutdown.await;
            return;
        }
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => return,
                _ = ticks.tick() => {}
            }
            tokio::select! {
                biased;
                _ = &mut shutdown => return,
                res = self.sync() => if let Err(e) = res {
                    error!(error = %format!("{e:#}"), "node sync failed");
                },
            }
        }
    }

    /// On exit: rules first, then the addresses/interface (unless skip_teardown).
    pub async fn teardown(&self) -> anyhow::Result<()> {
        let mut st = self.state.lock().await;
        st.torn_down = true;
        if self.cfg.skip_teardown {
            info!("skip_teardown set: leaving interface, addresses and firewall rules in place");
            return Ok(());
        }
        let mut errs = Vec::new();
        if self.cfg.setup_iptables {
            if let Err(e) = self.remove_rules(&mut st).await {
                errs.push(e);
            }
            st.rules_wanted = false;
        }
        if self.cfg.setup_interface {
            let created = st.created_link;
            match link::remove(&self.cfg.interface_name, &self.link_ips, &st.added, created).await {
                Ok(r) => {
                    if r.link_deleted {
                        info!(interface = %self.cfg.interface_name, "deleted interface");
                    }
                    if !r.addrs_deleted.is_empty() {
                        info!(interface = %self.cfg.interface_name, addresses = ?r.addrs_deleted, "removed addresses");
                    }
                    if !r.addrs_kept.is_empty() {
                        info!(interface = %self.cfg.interface_name, addresses = ?r.addrs_kept,
                            "left addresses nodedns did not add");
                    }
                }
                Err(e) => errs.push(self.link_failure(e)),
            }
            st.interface_wanted = false;
            st.added.clear();
            st.created_link = false;
        }
        combine(errs)
    }

    fn link_failure(&self, e: LinkError) -> anyhow::Error {
        self.errors.setup_error(e.errortype());
        anyhow!(e)
    }

    async fn ensure_interface(&self, st: &mut State, resync: bool) -> anyhow::Result<()> {
        let name = &self.cfg.interface_name;
        if self.link_ips.is_empty() {
            debug!(interface = %name, "no listen address needs to live on the interface");
            return Ok(());
        }
        let rep = link::ensure(name, &self.link_ips)
            .await
            .map_err(|e| self.link_failure(e))?;
        if rep.created {
            st.created_link = true;
            if resync {
                warn!(interface = %name, "interface was missing: re-created it");
            } else {
                info!(interface = %name, "created dummy interface");
            }
        } else if !resync {
            info!(interface = %name, owned = rep.owned, "using existing interface");
            if rep.down {
                warn!(interface = %name, "interface is down: its addresses may not receive traffic");
            }
        }
        if rep.owned && !rep.created {
            // A dummy link carrying our alias is ours even if a previous run created it.
            st.created_link = true;
        }
        if !rep.added.is_empty() {
            if resync && !rep.created {
                warn!(interface = %name, addresses = ?rep.added, "addresses were missing: added them back");
            } else {
                info!(interface = %name, addresses = ?rep.added, "added addresses");
            }
        }
        st.added.extend(rep.added);
        Ok(())
    }

    async fn iptables(&self, st: &mut State) -> anyhow::Result<Iptables> {
        if let Some(ipt) = &st.iptables {
            return Ok(ipt.clone());
        }
        match Iptables::detect().await {
            Ok(ipt) => {
                st.iptables = Some(ipt.clone());
                Ok(ipt)
            }
            Err(e) => {
                self.errors.setup_error(e.errortype());
                Err(anyhow!(e))
            }
        }
    }

    fn nft(&self) -> anyhow::Result<Nft> {
        Nft::find().inspect_err(|_| self.errors.setup_error("iptables"))
    }

    fn failopen(&self) -> &[FailOpen] {
        &self.failopen.redirects
    }

    async fn ensure_rules(&self, st: &mut State, resync: bool) -> anyhow::Result<()> {
        if self.rules.is_empty() && self.failopen().is_empty() {
            debug!("no listen address needs firewall rules");
            return Ok(());
        }
        let mut errs = Vec::new();
        if !st.leftovers_removed {
            // Adopt what an earlier run (or node-cache) left: drop what we would not install,
            // keep the rest, so nothing is doubled and nothing unconditional stays. A failure
            // here does not stop serving; the next sync tries again.
            match self.remove_leftovers(st).await {
                Ok(()) => st.leftovers_removed = true,
                Err(e) => warn!(error = %format!("{e:#}"),
                    "could not remove leftover firewall rules: retrying at the next sync"),
            }
        }
        match self.cfg.firewall {
            Firewall::Iptables => {
                let ipt = self.iptables(st).await?;
                let mut added = 0;
                for rule in &self.rules {
                    match ipt.ensure(rule).await {
                        Ok(true) => {
                            added += 1;
                            if resync {
                                warn!(rule = %rule.describe(), "firewall rule was missing: added it back");
                            }
                        }
                        Ok(false) => {}
                        Err(e) => {
                            self.errors.setup_error(e.errortype());
                            error!(rule = %rule.describe(), error = %e, "could not install firewall rule");
                            let locked = matches!(e, IptError::Lock(_));
                            errs.push(anyhow!(e));
                            if locked {
                                // Someone holds the xtables lock: each further rule would wait
                                // out the timeout again. The next sync retries.
                                break;
                            }
                        }
                    }
                }
                if !resync {
                    info!(backend = %ipt.mode, added, total = self.rules.len(), "iptables rules in place");
                }
                if !self.failopen().is_empty() {
                    // iptables has no stateless NAT: the redirect is an nftables table either way.
                    if let Err(e) = self.ensure_nft(st, resync, &[]).await {
                        errs.push(e.context(
                            "fail-open redirect (nftables, also with firewall = iptables; set \
                             node.fail_open_to = \"off\" to run without it)",
                        ));
                    }
                }
            }
            Firewall::Nftables => {
                if let Err(e) = self.ensure_nft(st, resync, &self.rules).await {
                    errs.push(e);
                }
            }
        }
        if !resync && errs.is_empty() {
            self.log_fail_open();
        }
        combine(errs)
    }

    /// Says what keeps pods' DNS working while no nodedns runs.
    fn log_fail_open(&self) {
        for f in self.failopen() {
            info!(
                from = %f.from, to = %f.to, port = failopen::DNS_PORT,
                table = %format!("{} {}", nft::FAMILY, nft::TABLE),
                "fail-open in place: while no nodedns socket listens on {}, pods' queries to it \
                 go to {} through kube-proxy",
                SocketAddr::new(f.from, failopen::DNS_PORT), f.to
            );
        }
        for to in &self.failopen.no_source {
            info!(%to, "fail-open not needed: no listen address of its family on port 53 other \
                  than its target");
        }
        let uncovered: Vec<IpAddr> = rules::listen_ips(&self.cfg.listen)
            .into_iter()
            .filter(failopen::is_node_local)
            .filter(|ip| {
                !self
                    .failopen()
                    .iter()
                    .any(|f| f.from.is_ipv4() == ip.is_ipv4())
                    && !self
                        .failopen
                        .no_source
                        .iter()
                        .any(|t| t.is_ipv4() == ip.is_ipv4())
            })
            .collect();
        if !uncovered.is_empty() {
            warn!(addresses = ?uncovered, "fail-open off for these addresses (no fail_open_to of \
                  their family): while nodedns is not running, pods' queries to them get no answer");
        }
        if self.rules.iter().any(|r| r.if_listening) {
            info!(
                "NOTRACK in raw PREROUTING applies only while a nodedns socket listens; NOTRACK \
                   in raw OUTPUT (host-network clients) is unconditional"
            );
        }
    }

    /// Creates or re-checks our nftables table: `rules` plus the fail-open chains.
    async fn ensure_nft(&self, st: &mut State, resync: bool, rules: &[Rule]) -> anyhow::Result<()> {
        let nft = self.nft()?;
        let result: anyhow::Result<()> = async {
            if resync {
                let current = nft.list().await?;
                match (&current, &st.nft_applied) {
                    (Some(cur), Some(applied)) if cur == applied => return Ok(()),
                    (None, _) => warn!(table = %format!("{} {}", nft::FAMILY, nft::TABLE),
                        "nftables table was missing: re-creating it"),
                    _ => warn!(table = %format!("{} {}", nft::FAMILY, nft::TABLE),
                        "nftables table was changed: replacing it"),
                }
            }
            let failopen = self.failopen();
            nft.apply(rules, failopen).await?;
            st.nft_applied = nft.list().await?;
            if !resync {
                let n = rules.len() + failopen::rule_count(failopen);
                info!(table = %format!("{} {}", nft::FAMILY, nft::TABLE),
                    rules = n, "nftables rules in place");
            }
            Ok(())
        }
        .await;
        result.inspect_err(|_| self.errors.setup_error("iptables"))
    }

    /// On start: removes node-cache's iptables rules, iptables rules of ours this run would not
    /// install (another listen address, an older rule form, the other firewall backend) and,
    /// with firewall = iptables and no fail-open, a table of ours left in nftables.
    async fn remove_leftovers(&self, st: &mut State) -> anyhow::Result<()> {
        let ipt = match self.cfg.firewall {
            Firewall::Iptables => Some(self.iptables(st).await?),
            // node-cache only ever used iptables; without any iptables there is nothing to find.
            Firewall::Nftables => match Iptables::detect().await {
                Ok(ipt) => Some(ipt),
                Err(e) => {
                    debug!(error = %e, "no iptables: no node-cache or iptables leftovers to look for");
                    None
                }
            },
        };
        let mut errs = Vec::new();
        if let Some(ipt) = ipt {
            let wanted: &[Rule] = match self.cfg.firewall {
                Firewall::Iptables => &self.rules,
                Firewall::Nftables => &[],
            };
            let has_v6 = self.rules.iter().any(Rule::is_v6);
            for v6 in [false, true] {
                match ipt.remove_leftovers(v6, wanted).await {
                    Ok((node_cache, stale)) => {
                        if !node_cache.is_empty() {
                            info!(removed = node_cache.len(), rules = ?node_cache, ipv6 = v6,
                                "removed node-cache's iptables rules");
                        }
                        if !stale.is_empty() {
                            info!(removed = stale.len(), rules = ?stale, ipv6 = v6,
                                "removed iptables rules of an earlier nodedns run that this one does not use");
                        }
                    }
                    // Without IPv6 listen addresses a missing ip6tables table is no failure.
                    Err(e) if v6 && !has_v6 && !matches!(e, IptError::Lock(_)) => {
                        debug!(error = %e, "ip6tables leftover sweep skipped")
                    }
                    Err(e) => {
                        self.errors.setup_error(e.errortype());
                        errs.push(anyhow!(e));
                    }
                }
            }
        }
        if self.cfg.firewall == Firewall::Iptables && self.failopen().is_empty() {
            if let Ok(nft) = Nft::find() {
                match nft.delete().await {
                    Ok(true) => info!(table = %format!("{} {}", nft::FAMILY, nft::TABLE),
                        "deleted the nftables table of an earlier run (fail-open is off)"),
                    Ok(false) => {}
                    Err(e) => {
                        self.errors.setup_error("iptables");
                        errs.push(e);
                    }
                }
            }
        }
        combine(errs)
    }

    async fn remove_rules(&self, st: &mut State) -> anyhow::Result<()> {
        match self.cfg.firewall {
            Firewall::Iptables => {
                let ipt = self.iptables(st).await?;
                // A stale NOTRACK rule breaks DNS to that IP, so a busy xtables lock (kube-proxy
                // mid-sync) gets a few more chances before we give up.
                let mut attempt = 1;
                let mut errs = loop {
                    let (deleted, errs, locked) = self.remove_iptables_rules(&ipt).await;
                    if locked && attempt < TEARDOWN_LOCK_ATTEMPTS {
                        warn!(attempt, "xtables lock busy while removing rules: retrying");
                        attempt += 1;
                        continue;
                    }
                    info!(deleted, "removed iptables rules");
                    break errs;
                };
                // The fail-open table, if an earlier or this run made one.
                let nft = if self.failopen().is_empty() {
                    Nft::find().ok()
                } else {
                    self.nft().map_err(|e| errs.push(e)).ok()
                };
                if let Some(nft) = nft {
                    if let Err(e) = self.delete_nft(&nft, st).await {
                        errs.push(e);
                    }
                }
                combine(errs)
            }
            Firewall::Nftables => {
                let nft = self.nft()?;
                self.delete_nft(&nft, st).await
            }
        }
    }

    async fn delete_nft(&self, nft: &Nft, st: &mut State) -> anyhow::Result<()> {
        st.nft_applied = None;
        match nft.delete().await {
            Ok(true) => {
                info!(table = %format!("{} {}", nft::FAMILY, nft::TABLE), "deleted nftables table");
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) => {
                self.errors.setup_error("iptables");
                Err(e)
            }
        }
    }
}

impl NodeManager {
    /// One pass over our iptables rules: every configured rule, then anything else carrying our
    /// comment. Returns (rules deleted, failures, whether the pass stopped on the xtables lock).
    async fn remove_iptables_rules(&self, ipt: &Iptables) -> (usize, Vec<anyhow::Error>, bool) {
        let mut errs = Vec::new();
        let mut deleted = 0;
        let fail = |e: IptError, errs: &mut Vec<anyhow::Error>| {
            self.errors.setup_error(e.errortype());
            let locked = matches!(e, IptError::Lock(_));
            errs.push(anyhow!(e));
            locked
        };
        for rule in &self.rules {
            match ipt.delete_all(rule).await {
                Ok(n) => deleted += n,
                Err(e) => {
                    if fail(e, &mut errs) {
                        return (deleted, errs, true);
                    }
                }
            }
        }
        let has_v6 = self.rules.iter().any(Rule::is_v6);
        for v6 in [false, true] {
            match ipt.sweep(v6).await {
                Ok(n) => deleted += n,
                // Without IPv6 listen addresses a missing ip6tables table is no failure.
                Err(e) if v6 && !has_v6 && !matches!(e, IptError::Lock(_)) => {
                    debug!(error = %e, "ip6tables sweep skipped")
                }
                Err(e) => {
                    if fail(e, &mut errs) {
                        return (deleted, errs, true);
                    }
                }
            }
        }
        (deleted, errs, false)
    }
}

fn combine(mut errs: Vec<anyhow::Error>) -> anyhow::Result<()> {
    match errs.len() {
        0 => Ok(()),
        1 => Err(errs.remove(0)),
        n => {
            let all: Vec<String> = errs.iter().map(|e| format!("{e:#}")).collect();
            Err(anyhow!("{n} node setup failures: {}", all.join("; ")))
        }
    }
}
