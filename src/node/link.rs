//! The link that holds the listen addresses, managed over netlink (rtnetlink).
//!
//! Normally a `dummy` link of our own (node-cache's `nodelocaldns`). Where the kernel has no dummy
//! link type an existing link can be named instead (e.g. `lo`); then only our own addresses are
//! added and removed and the link itself is never deleted.
//!
//! Ownership survives restarts through markers: a link we create gets the alias [`LINK_ALIAS`],
//! and each address we add carries the address protocol [`ADDR_PROTO`] (`IFA_PROTO`, Linux 6.1+;
//! older kernels ignore it and we fall back to remembering what this process added).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use futures::TryStreamExt;
use rtnetlink::packet_core::{DefaultNla, Nla};
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::RouteType;
use rtnetlink::{Handle, LinkDummy, LinkUnspec, RouteMessageBuilder};

/// Alias set on a dummy link nodedns created, so a later run knows it may delete it.
pub const LINK_ALIAS: &str = "nodedns: created by nodedns";
/// `IFA_PROTO` netlink attribute type.
const IFA_PROTO: u16 = 11;
/// Address protocol value marking addresses nodedns added (`ip addr` shows it as `proto 0x4e`).
pub const ADDR_PROTO: u8 = 0x4e;

const ENODEV: i32 = libc::ENODEV;
const EEXIST: i32 = libc::EEXIST;
const EOPNOTSUPP: i32 = libc::EOPNOTSUPP;
const EADDRNOTAVAIL: i32 = libc::EADDRNOTAVAIL;

#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkError {
    /// Creating the link (or populating a link we just created) failed.
    #[error("{0}")]
    Add(String),
    /// Inspecting the link, or restoring addresses on an existing link, failed.
    #[error("{0}")]
    Check(String),
}

impl LinkError {
    pub(crate) fn errortype(&self) -> &'static str {
        match self {
            LinkError::Add(_) => "interface_add",
            LinkError::Check(_) => "interface_check",
        }
    }
}

/// What [`ensure`] found and changed.
#[derive(Debug, Default)]
pub(crate) struct Ensured {
    /// We created the link just now.
    pub created: bool,
    /// The link is ours to delete (created now, or carries our alias).
    pub owned: bool,
    /// Addresses that were missing and have been added.
    pub added: Vec<IpAddr>,
    /// The link is administratively down (addresses on it may not receive traffic).
    pub down: bool,
}

/// What [`remove`] did.
#[derive(Debug, Default)]
pub(crate) struct Removed {
    pub link_deleted: bool,
    pub addrs_deleted: Vec<IpAddr>,
    /// Listen addresses on the link that nodedns did not add, left alone.
    pub addrs_kept: Vec<IpAddr>,
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn connect() -> Result<Handle, LinkError> {
    let (conn, handle, _) = rtnetlink::new_connection()
        .map_err(|e| LinkError::Check(format!("opening a netlink socket: {e}")))?;
    tokio::spawn(conn);
    Ok(handle)
}

async fn find_link(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, rtnetlink::Error> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(l) => Ok(l),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

fn is_dummy(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Dummy))),
        _ => false,
    })
}

fn has_our_alias(link: &LinkMessage) -> bool {
    link.attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::IfAlias(s) if s == LINK_ALIAS))
}

fn is_up(link: &LinkMessage) -> bool {
    use rtnetlink::packet_route::link::LinkFlags;
    link.header.flags.contains(LinkFlags::Up)
}

fn full_prefix(ip: &IpAddr) -> u8 {
    if ip.is_ipv6() {
        128
    } else {
        32
    }
}

fn addr_ip(m: &AddressMessage) -> Option<IpAddr> {
    // IPv4 carries the interface address in IFA_LOCAL, IPv6 in IFA_ADDRESS.
    m.attributes
        .iter()
        .find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        })
        .or_else(|| {
            m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        })
}

fn has_our_proto(m: &AddressMessage) -> bool {
    m.attributes.iter().any(|a| match a {
        AddressAttribute::Other(nla) if nla.kind() == IFA_PROTO && nla.value_len() == 1 => {
            let mut v = [0u8; 1];
            nla.emit_value(&mut v);
            v[0] == ADDR_PROTO
        }
        _ => false,
    })
}

/// Our listen addresses (exact /32 or /128) currently on the link, with their messages.
async fn our_addrs(
    handle: &Handle,
    index: u32,
    ips: &[IpAddr],
) -> Result<Vec<(IpAddr, AddressMessage)>, rtnetlink::Error> {
    let all: Vec<AddressMessage> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await?;
    Ok(all
        .into_iter()
        .filter(|m| m.header.index == index)
        .filter_map(|m| {
            let ip = addr_ip(&m)?;
            (ips.contains(&ip) && m.header.prefix_len == full_prefix(&ip)).then_some((ip, m))
        })
        .collect())
}

fn no_dummy_message(name: &str, e: &rtnetlink::Error) -> String {
    format!(
        "cannot create interface {name}: this kernel has no `dummy` link type ({e}; it needs \
         CONFIG_DUMMY or the dummy module). Name an existing link instead, e.g. \
         `--interface-name lo` (config key interface_name): nodedns then only adds and removes \
         its own addresses on that link and never deletes it"
    )
}

/// Makes sure the link exists (creating a dummy link if not) and holds every IP as /32 or /128.
pub(crate) async fn ensure(name: &str, ips: &[IpAddr]) -> Result<Ensured, LinkError> {
    let handle = connect()?;
    let mut report = Ensured::default();
    let existing = find_link(&handle, name)
        .await
        .map_err(|e| LinkError::Check(format!("looking up interface {name}: {e}")))?;
    let link = match existing {
        Some(l) => l,
        None => {
            let msg = LinkDummy::new(name).up().build();
            match handle.link().add(msg).execute().await {
                Ok(()) => report.created = true,
                // Someone created it between our lookup and our add: use theirs.
                Err(e) if errno(&e) == Some(EEXIST) => {}
                Err(e) if errno(&e) == Some(EOPNOTSUPP) => {
                    return Err(LinkError::Add(no_dummy_message(name, &e)))
                }
                Err(e) => {
                    return Err(LinkError::Add(format!(
                        "cannot create dummy interface {name}: {e} (nodedns needs CAP_NET_ADMIN; \
                         or name an existing link, e.g. `--interface-name lo`)"
                    )))
                }
            }
            let link = find_link(&handle, name)
                .await
                .map_err(|e| LinkError::Add(format!("looking up new interface {name}: {e}")))?
                .ok_or_else(|| {
                    LinkError::Add(format!("interface {name} vanished right after creation"))
                })?;
            if report.created {
                let alias = LinkUnspec::new_with_index(link.header.index)
                    .append_extra_attribute(LinkAttribute::IfAlias(LINK_ALIAS.to_string()))
                    .build();
                if let Err(e) = handle.link().set(alias).execute().await {
                    tracing::warn!(interface = name, error = %e, "could not mark interface as created by nodedns");
                }
            }
            link
        }
    };
    let index = link.header.index;
    report.owned = report.created || (is_dummy(&link) && has_our_alias(&link));
    report.down = !report.created && !is_up(&link);
    let fail = |msg: String| {
        if report.created {
            LinkError::Add(msg)
        } else {
            LinkError::Check(msg)
        }
    };

    let present: HashSet<IpAddr> = our_addrs(&handle, index, ips)
        .await
        .map_err(|e| fail(format!("listing addresses of {name}: {e}")))?
        .into_iter()
        .map(|(ip, _)| ip)
        .collect();
    for ip in ips.iter().filter(|ip| !present.contains(ip)) {
        let mut req = handle.address().add(index, *ip, full_prefix(ip));
        let m = req.message_mut();
        m.attributes.push(AddressAttribute::Other(DefaultNla::new(
            IFA_PROTO,
            vec![ADDR_PROTO],
        )));
        if ip.is_ipv6() {
            // Never leave the address "tentative": it has to be usable at once.
            m.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match req.execute().await {
            Ok(()) => report.added.push(*ip),
            Err(e) if errno(&e) == Some(EEXIST) => {}
            Err(e) => {
                return Err(fail(format!(
                    "adding {ip}/{} to {name}: {e}",
                    full_prefix(ip)
                )))
            }
        }
    }
    for ip in report.added.iter().filter(|ip| ip.is_ipv6()) {
        wait_local(&handle, *ip, name).await;
    }
    Ok(report)
}

/// How long [`wait_local`] waits for the kernel to deliver a new IPv6 address locally.
const LOCAL_ROUTE_WAIT: Duration = Duration::from_secs(2);

/// Waits until packets to the new IPv6 address `ip` are delivered locally. The kernel adds an
/// IPv6 address's `local` route from a work queue, after the address itself (even with
/// `nodad`); a packet sent in between is lost (seen in about 4% of tries: a datagram sent right
/// after `ip addr add ... nodad` never arrives), and a socket connected then may keep the route
/// it got. Warns after [`LOCAL_ROUTE_WAIT`].
async fn wait_local(handle: &Handle, ip: IpAddr, name: &str) {
    let IpAddr::V6(v6) = ip else { return };
    let started = tokio::time::Instant::now();
    loop {
        let msg = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(v6, 128)
            .build();
        let mut found = handle.route().get(msg).execute();
        if let Ok(Some(route)) = found.try_next().await {
            if route.header.kind == RouteType::Local {
                return;
            }
        }
        if started.elapsed() >= LOCAL_ROUTE_WAIT {
            tracing::warn!(interface = name, address = %ip, waited = ?LOCAL_ROUTE_WAIT,
                "the kernel does not yet deliver packets to this address locally");
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Removes what nodedns put there: the whole link if it is ours, else only the listen addresses
/// this process added or that carry our address marker.
pub(crate) async fn remove(
    name: &str,
    ips: &[IpAddr],
    added_here: &HashSet<IpAddr>,
    created_here: bool,
) -> Result<Removed, LinkError> {
    let handle = connect()?;
    let mut report = Removed::default();
    let Some(link) = find_link(&handle, name)
        .await
        .map_err(|e| LinkError::Check(format!("looking up interface {name}: {e}")))?
    else {
        return Ok(report);
    };
    let index = link.header.index;
    if is_dummy(&link) && (created_here || has_our_alias(&link)) {
        match handle.link().del(index).execute().await {
            Ok(()) => report.link_deleted = true,
            Err(e) if errno(&e) == Some(ENODEV) => {}
            Err(e) => return Err(LinkError::Check(format!("deleting interface {name}: {e}"))),
        }
        return Ok(report);
    }
    let addrs = our_addrs(&handle, index, ips)
        .await
        .map_err(|e| LinkError::Check(format!("listing addresses of {name}: {e}")))?;
    for (ip, msg) in addrs {
        if !(added_here.contains(&ip) || has_our_proto(&msg)) {
            report.addrs_kept.push(ip);
            continue;
        }
        match handle.address().del(msg).execute().await {
            Ok(()) => report.addrs_deleted.push(ip),
            Err(e) if errno(&e) == Some(EADDRNOTAVAIL) => {}
            Err(e) => {
                return Err(LinkError::Check(format!(
                    "removing {ip}/{} from {name}: {e}",
                    full_prefix(&ip)
                )))
            }
        }
    }
    Ok(report)
}
