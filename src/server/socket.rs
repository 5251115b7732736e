//! Listening sockets. Every DNS socket sets SO_REUSEPORT so that each UDP worker has its own
//! socket (the kernel spreads flows across them). An upgrade does not rely on it: the new
//! instance receives the old one's sockets (`lifecycle::handover`) and binds only what it did
//! not get. Admin (HTTP) listeners do not share their port: one instance owns it.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::lifecycle::handover::{Handed, Kind};

/// Receive buffer asked for each UDP socket; the kernel caps it at `net.core.rmem_max`.
const UDP_RECV_BUFFER: usize = 4 << 20;
/// How often a blocked UDP worker wakes to check for shutdown.
pub const UDP_POLL: Duration = Duration::from_millis(100);

fn new_socket(addr: SocketAddr, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    // Binding a link-local or service IP that is not (yet) on an interface must not fail.
    s.set_freebind_v4(true).ok();
    Ok(s)
}

/// A blocking UDP socket for one worker thread, with a short receive timeout so the worker can
/// notice shutdown.
pub fn build_udp_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let s = new_socket(addr, Type::DGRAM, Protocol::UDP)?;
    s.set_recv_buffer_size(UDP_RECV_BUFFER).ok();
    if let Err(e) = set_dont_fragment(&s, addr) {
        tracing::warn!(%addr, error = %e, "cannot set DF on the UDP socket: replies larger than the MTU will be fragmented");
    }
    s.bind(&addr.into())?;
    s.set_read_timeout(Some(UDP_POLL))?;
    Ok(s.into())
}

/// Replies leave with DF set and are never fragmented by this host (RFC 9715 §3.2, R1): a reply
/// longer than the outgoing interface's MTU fails to send with EMSGSIZE, and the worker sends a
/// TC=1 reply instead (R2), so the client retries over TCP. PROBE mode uses the interface MTU and
/// ignores path MTU values learnt from ICMP, which an off-path attacker can forge. Side effect
/// on IPv4: a DF datagram from an unconnected socket gets IP ID 0 instead of one from the
/// kernel's shared, hashed ID generator (`__ip_select_ident`, 2% of the CPU of a cache hit).
fn set_dont_fragment(s: &Socket, addr: SocketAddr) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (level, name, value) = if addr.is_ipv6() {
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_PROBE,
        )
    } else {
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_PROBE,
        )
    };
    // SAFETY: setsockopt on a socket we own, with a c_int option value of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A non-blocking TCP listener for DNS, ready for tokio.
pub fn build_tcp_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = new_socket(addr, Type::STREAM, Protocol::TCP)?;
    s.set_tcp_nodelay(true).ok();
    s.bind(&addr.into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// A non-blocking TCP listener for the admin endpoints: no SO_REUSEPORT, so a second instance
/// cannot silently share `/ready` and `/metrics` with the first (it takes them over through the
/// handover, or fails to start naming the address).
pub fn build_admin_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_freebind_v4(true).ok();
    s.bind(&addr.into())?;
    s.listen(128)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// The sockets for one listen address: `workers` UDP sockets and one TCP listener, all on the
/// same port (when the configured port is 0, the first socket's port is reused for the rest).
pub struct Bound {
    pub addr: SocketAddr,
    pub udp: Vec<std::net::UdpSocket>,
    pub tcp: std::net::TcpListener,
}

/// Binds every listen address, failing with the address named on any error. Sockets handed over
/// by the instance serving before this one are used as they are (every UDP socket of the group
/// gets a worker, so none is left unread); only what is missing is bound.
pub fn bind_all(
    listen: &[SocketAddr],
    workers: usize,
    mut handed: Option<&mut Handed>,
) -> anyhow::Result<Vec<Bound>> {
    let mut out = Vec::new();
    for &want in listen {
        if let Some(h) = handed.as_deref_mut().filter(|_| want.port() != 0) {
            let udp: Vec<std::net::UdpSocket> = h
                .take(Kind::Udp, want)
                .into_iter()
                .map(Into::into)
                .collect();
            let tcp = h.take(Kind::Tcp, want).into_iter().next();
            if !udp.is_empty() || tcp.is_some() {
                out.push(adopt(want, workers, udp, tcp)?);
                continue;
            }
        }
        // Port 0 (tests, local trials): the kernel picks a free UDP port, which TCP may already
        // use; pick again a few times rather than fail.
        let tries = if want.port() == 0 { 20 } else { 1 };
        let mut attempt = 0;
        loop {
            attempt += 1;
            match bind_one(want, workers) {
                Ok(b) => {
                    out.push(b);
                    break;
                }
                Err(e) if attempt < tries && is_addr_in_use(&e) => continue,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(out)
}

/// True when `e` (or its cause) is EADDRINUSE.
pub fn is_addr_in_use(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::AddrInUse)
    })
}

/// Completes handed-over sockets to a full set for `addr`.
fn adopt(
    addr: SocketAddr,
    workers: usize,
    mut udp: Vec<std::net::UdpSocket>,
    tcp: Option<std::os::fd::OwnedFd>,
) -> anyhow::Result<Bound> {
    use anyhow::Context as _;
    let handed = udp.len();
    while udp.len() < workers.max(1) {
        udp.push(
            build_udp_socket(addr)
                .with_context(|| format!("failed to bind UDP socket on {addr}"))?,
        );
    }
    let tcp = match tcp {
        Some(fd) => {
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true)?;
            l
        }
        None => build_tcp_listener(addr)
            .with_context(|| format!("failed to bind TCP listener on {addr}"))?,
    };
    tracing::info!(%addr, handed, udp = udp.len(), "took over the listening sockets of the running instance");
    Ok(Bound { addr, udp, tcp })
}

fn bind_one(want: SocketAddr, workers: usize) -> anyhow::Result<Bound> {
    use anyhow::Context as _;
    let first =
        build_udp_socket(want).with_context(|| format!("failed to bind UDP socket on {want}"))?;
    let addr = first.local_addr()?;
    let mut udp = vec![first];
    for _ in 1..workers.max(1) {
        udp.push(
            build_udp_socket(addr)
                .with_context(|| format!("failed to bind UDP socket on {addr}"))?,
        );
    }
    let tcp = build_tcp_listener(addr)
        .with_context(|| format!("failed to bind TCP listener on {addr}"))?;
    Ok(Bound { addr, udp, tcp })
}
