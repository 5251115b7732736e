//! What node setup is asked to do: [`NodeConfig`] (built by the config validation) and the
//! [`Firewall`] backend choice.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which firewall tool installs the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Firewall {
    /// iptables/ip6tables, nf_tables or legacy backend detected like the Kubernetes iptables-wrapper.
    #[default]
    Iptables,
    /// One nftables table of our own, `table inet nodedns`, replaced and removed atomically.
    Nftables,
}

impl fmt::Display for Firewall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Firewall::Iptables => "iptables",
            Firewall::Nftables => "nftables",
        })
    }
}

impl FromStr for Firewall {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "iptables" => Ok(Firewall::Iptables),
            "nftables" => Ok(Firewall::Nftables),
            other => Err(format!(
                "unknown firewall {other:?}: expected \"iptables\" or \"nftables\""
            )),
        }
    }
}

/// What to set up on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Create/ensure the link and its addresses.
    pub setup_interface: bool,
    /// The link holding the listen IPs; created as a dummy link unless it already exists.
    pub interface_name: String,
    /// Install the conntrack-bypass firewall rules.
    pub setup_iptables: bool,
    pub firewall: Firewall,
    /// How often [`NodeManager::run_sync_loop`] re-checks everything (zero disables it).
    pub sync_interval: Duration,
    /// Leave the rules, addresses and link in place on exit (HA pairs of DaemonSets).
    pub skip_teardown: bool,
    /// The DNS listen addresses; every IP goes on the link, every IP and port gets rules.
    pub listen: Vec<SocketAddr>,
    /// Health port (tcp) to exempt from conntrack on every listen IP, node-cache's 8080.
    pub health_port: Option<u16>,
    /// The kube-dns Service IPs, at most one per IP family: while no nodedns socket listens on
    /// the node-local listen IP of that family, queries to it on port 53 are redirected there
    /// (see `failopen`). Empty: no redirect.
    pub fail_open_to: Vec<IpAddr>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            setup_interface: false,
            interface_name: "nodelocaldns".to_string(),
            setup_iptables: false,
            firewall: Firewall::Iptables,
            sync_interval: Duration::from_secs(60),
            skip_teardown: false,
            listen: Vec::new(),
            health_port: None,
            fail_open_to: Vec::new(),
        }
    }
}
