//! Node setup: link-local interface and conntrack-bypass firewall rules (see issue 4).
