//! Handover: a starting instance takes the listening sockets and the cache of the instance that
//! already serves the node, so an upgrade loses no query and starts warm.
//!
//! Closing a `SO_REUSEPORT` socket drops the datagrams queued on it, and the kernel re-hashes
//! flows when the group changes, so "bind beside the old one, then let it exit" loses queries.
//! Instead the new instance receives the very sockets the old one serves on (`SCM_RIGHTS` over
//! the old instance's `handover.<id>.sock`, a `SOCK_SEQPACKET` socket in the state directory):
//! both then read the same queues, and when the old one stops reading nothing is dropped, since
//! the sockets stay open. Its TCP connections follow at its shutdown, each at a message boundary
//! with the bytes already read, so a pipelined client loses nothing either.
//!
//! The conversation, one seqpacket message each (first byte the type):
//! 1. new → old `H`: protocol version, then one line per wanted listener (`udp ADDR`, `tcp ADDR`,
//!    `http ADDR`), and `cache` when it wants the cache.
//! 2. old → new `F`: `KIND ADDR` with descriptors attached (several messages for many sockets);
//!    `E` when done.
//! 3. old → new `C`: cache snapshot bytes, in chunks; `D` when done.
//! 4. new → old `T`: the new instance serves. The old one stops serving the admin (HTTP)
//!    listeners it handed over (one owner per admin port). The channel stays open both ways:
//!    whichever instance stops first sends `X` (one TCP connection, the bytes read from it
//!    attached) per open connection, `A ADDR` per admin listener it still serves, and `Q` at
//!    the end, and the other one serves them.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::fdpass::{self, Channel, MAX_FDS, MAX_MSG};
use super::StateDir;

const VERSION: &str = "nodedns-handover 1";
/// How long either side waits for the other's next message during the exchange.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Udp,
    Tcp,
    Http,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Udp => "udp",
            Kind::Tcp => "tcp",
            Kind::Http => "http",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        match s {
            "udp" => Some(Kind::Udp),
            "tcp" => Some(Kind::Tcp),
            "http" => Some(Kind::Http),
            _ => None,
        }
    }
}

/// One listener this instance can hand over: its own duplicates of the descriptors, so they
/// stay valid while the server runs whatever the workers do with theirs.
pub struct Offered {
    pub kind: Kind,
    pub addr: SocketAddr,
    pub fds: Vec<OwnedFd>,
    /// Cancelled once a successor has taken this listener and serves it (admin listeners: stop
    /// serving them here).
    pub on_taken: Option<CancellationToken>,
}

/// Writes the cache snapshot into the stream.
pub type CacheWriter = Box<dyn Fn(&mut dyn Write) -> io::Result<()> + Send + Sync>;

/// Everything the handover server hands to a successor.
pub struct Offer {
    pub listeners: Vec<Offered>,
    pub cache: Option<CacheWriter>,
    /// Where the channel goes once a successor serves.
    pub peers: Arc<Peers>,
    /// What this instance does with what a successor hands back.
    pub adopter: Arc<dyn Adopter>,
}

/// What a peer hands back over the channel: TCP connections and admin listeners.
pub trait Adopter: Send + Sync {
    /// Serve a TCP connection, starting with the bytes already read from it.
    fn tcp(&self, stream: std::net::TcpStream, read: Vec<u8>);
    /// Serve the admin endpoints on `addr` with this listener.
    fn admin(&self, addr: SocketAddr, listener: std::net::TcpListener);
    /// The instance that took our listeners went away without a goodbye (it crashed): serve
    /// again what was handed to it and is still ours.
    fn successor_lost(&self);
}

/// The instances this one exchanged listeners with: the newest one that took ours (successor)
/// and the one we took ours from (predecessor). At shutdown, open TCP connections and the admin
/// listeners still served here go to the successor, or back to the predecessor when it is still
/// alive (the newer half of an HA pair stopping first).
#[derive(Default)]
pub struct Peers {
    successor: Mutex<Option<Arc<Channel>>>,
    predecessor: Mutex<Option<Arc<Channel>>>,
}

impl Peers {
    /// True when a peer may take connections.
    pub fn any(&self) -> bool {
        self.successor.lock().is_some() || self.predecessor.lock().is_some()
    }

    pub fn has_successor(&self) -> bool {
        self.successor.lock().is_some()
    }

    /// Sends one message with one descriptor to the first peer that takes it.
    fn give(&self, msg: &[u8], fd: RawFd) -> bool {
        for slot in [&self.successor, &self.predecessor] {
            let mut guard = slot.lock();
            let Some(chan) = guard.as_ref() else {
                continue;
            };
            match chan.send(msg, &[fd]) {
                Ok(()) => return true,
                Err(e) => {
                    debug!(error = %e, "peer gone");
                    *guard = None;
                }
            }
        }
        false
    }

    /// Hands one TCP connection, with the bytes already read from it, to a peer. Gives the
    /// stream back when no peer takes it.
    pub fn give_tcp(
        &self,
        stream: std::net::TcpStream,
        read: &[u8],
    ) -> Result<(), std::net::TcpStream> {
        let mut msg = Vec::with_capacity(1 + read.len());
        msg.push(b'X');
        msg.extend_from_slice(read);
        if msg.len() <= MAX_MSG && self.give(&msg, stream.as_raw_fd()) {
            Ok(())
        } else {
            Err(stream)
        }
    }

    /// Hands an admin listener this instance still serves to a peer; true when taken.
    pub fn give_admin(&self, addr: SocketAddr, listener: &std::net::TcpListener) -> bool {
        self.give(format!("A{addr}").as_bytes(), listener.as_raw_fd())
    }

    /// Tells the peers that nothing more follows.
    pub fn finish(&self) {
        for slot in [&self.successor, &self.predecessor] {
            if let Some(chan) = slot.lock().take() {
                let _ = chan.send(b"Q", &[]);
            }
        }
    }
}

/// Takes what a peer hands over on `chan` until it says `Q` or goes away.
fn receive(chan: Arc<Channel>, adopter: Arc<dyn Adopter>, from_successor: bool) -> io::Result<()> {
    chan.set_read_timeout(None)?;
    std::thread::Builder::new()
        .name("nodedns-adopt".into())
        .spawn(move || {
            let mut buf = vec![0u8; MAX_MSG];
            let (mut conns, mut admins) = (0usize, 0usize);
            let mut goodbye = false;
            loop {
                match chan.recv(&mut buf) {
                    Ok((n, mut fds)) if n > 0 && fds.len() == 1 => match buf[0] {
                        b'X' => {
                            conns += 1;
                            adopter.tcp(fds.remove(0).into(), buf[1..n].to_vec());
                        }
                        b'A' => match std::str::from_utf8(&buf[1..n]).ok().and_then(|a| a.parse().ok()) {
                            Some(addr) => {
                                admins += 1;
                                info!(%addr, "took back an admin port from an instance that stopped");
                                adopter.admin(addr, fds.remove(0).into());
                            }
                            None => warn!("a handed admin listener came without its address"),
                        },
                        _ => warn!("unexpected handover message"),
                    },
                    Ok((n, _)) if n > 0 && buf[0] != b'Q' => {
                        warn!("a handed connection or listener came without its socket");
                    }
                    Ok((n, _)) => {
                        goodbye = n > 0;
                        break;
                    }
                    Err(_) => break,
                }
            }
            if from_successor && !goodbye {
                warn!("the instance that took over our listeners is gone; serving them again");
                adopter.successor_lost();
            }
            if conns > 0 {
                info!(connections = conns, "took over TCP connections");
            }
            let _ = admins;
        })?;
    Ok(())
}

/// Serves handover requests on this process's socket until `stop` is cancelled.
pub fn serve(
    state: &StateDir,
    offer: Arc<Offer>,
    stop: CancellationToken,
) -> io::Result<std::thread::JoinHandle<()>> {
    let path = state.handover_socket();
    let listener = fdpass::listen(&path)?;
    listener.set_nonblocking(true)?;
    info!(socket = %path.display(), "handover socket ready");
    std::thread::Builder::new()
        .name("nodedns-handover".into())
        .spawn(move || {
            while !stop.is_cancelled() {
                let mut pfd = libc::pollfd {
                    fd: listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd on a descriptor we own, for 200 ms.
                unsafe { libc::poll(&mut pfd, 1, 200) };
                let Ok((sock, _)) = listener.accept() else {
                    continue;
                };
                let offer = offer.clone();
                let r = sock.set_nonblocking(false).and_then(|()| {
                    std::thread::Builder::new()
                        .name("nodedns-handover-session".into())
                        .spawn(move || {
                            if let Err(e) = session(sock, &offer) {
                                warn!(error = %e, "handover to a new instance failed");
                            }
                        })
                        .map(drop)
                });
                if let Err(e) = r {
                    warn!(error = %e, "cannot serve a handover request");
                }
            }
            let _ = std::fs::remove_file(&path);
        })
}

fn session(sock: socket2::Socket, offer: &Offer) -> io::Result<()> {
    let chan = Channel::from_accepted(sock, STEP_TIMEOUT)?;
    let mut buf = vec![0u8; MAX_MSG];
    let (n, _) = chan.recv(&mut buf)?;
    let hello = std::str::from_utf8(&buf[..n]).map_err(|_| bad("hello is not text"))?;
    let mut lines = hello
        .strip_prefix('H')
        .ok_or_else(|| bad("no hello"))?
        .lines();
    if lines.next() != Some(VERSION) {
        return Err(bad("unknown handover protocol version"));
    }
    let mut wants = Vec::new();
    let mut wants_cache = false;
    for l in lines {
        if l == "cache" {
            wants_cache = true;
            continue;
        }
        let (k, a) = l.split_once(' ').ok_or_else(|| bad("bad request line"))?;
        let kind = Kind::parse(k).ok_or_else(|| bad("unknown listener kind"))?;
        let addr: SocketAddr = a.parse().map_err(|_| bad("bad listener address"))?;
        wants.push((kind, addr));
    }
    let mut handed = Vec::new();
    for o in &offer.listeners {
        if !wants.contains(&(o.kind, o.addr)) {
            continue;
        }
        let raw: Vec<RawFd> = o.fds.iter().map(|f| f.as_raw_fd()).collect();
        for chunk in raw.chunks(MAX_FDS) {
            chan.send(format!("F{} {}", o.kind.name(), o.addr).as_bytes(), chunk)?;
        }
        handed.push(o);
    }
    chan.send(b"E", &[])?;
    if wants_cache {
        if let Some(write) = &offer.cache {
            let mut w = Chunks {
                chan: &chan,
                buf: Vec::with_capacity(MAX_MSG),
            };
            write(&mut w)?;
            w.flush()?;
        }
        chan.send(b"D", &[])?;
    }
    // The successor binds what it did not get and starts serving, then says so.
    chan.set_read_timeout(Some(Duration::from_secs(60)))?;
    let (n, _) = chan.recv(&mut buf)?;
    if buf[..n] != *b"T" {
        return Err(bad("the new instance did not confirm"));
    }
    for o in handed {
        if let Some(t) = &o.on_taken {
            t.cancel();
        }
    }
    info!(
        listeners = offer.listeners.len(),
        "handed listeners to a new instance"
    );
    let chan = Arc::new(chan);
    *offer.peers.successor.lock() = Some(chan.clone());
    receive(chan, offer.adopter.clone(), true)?;
    Ok(())
}

/// Cache bytes as `C` messages.
struct Chunks<'a> {
    chan: &'a Channel,
    buf: Vec<u8>,
}

impl Write for Chunks<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.is_empty() {
            self.buf.push(b'C');
        }
        let n = data.len().min(MAX_MSG - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == MAX_MSG {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.len() > 1 {
            self.chan.send(&self.buf, &[])?;
        }
        self.buf.clear();
        Ok(())
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// What a new instance received from the one serving before it.
pub struct Handed {
    listeners: Vec<(Kind, SocketAddr, OwnedFd)>,
    /// The cache snapshot bytes, when asked for and offered.
    pub cache: Option<Vec<u8>>,
    pub from: PathBuf,
    chan: Channel,
}

impl Handed {
    /// The descriptors received for `kind` on `addr` (empty when none).
    pub fn take(&mut self, kind: Kind, addr: SocketAddr) -> Vec<OwnedFd> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.listeners.len() {
            if self.listeners[i].0 == kind && self.listeners[i].1 == addr {
                out.push(self.listeners.swap_remove(i).2);
            } else {
                i += 1;
            }
        }
        out
    }

    pub fn count(&self) -> usize {
        self.listeners.len()
    }

    /// Confirms that this instance serves. The channel stays open both ways: the old
    /// instance's TCP connections arrive on it at its shutdown, and this instance's go back on
    /// it if this one stops first.
    pub fn confirm(self, peers: &Peers, adopter: Arc<dyn Adopter>) -> io::Result<()> {
        self.chan.send(b"T", &[])?;
        let chan = Arc::new(self.chan);
        *peers.predecessor.lock() = Some(chan.clone());
        receive(chan, adopter, false)?;
        Ok(())
    }
}

/// Asks the newest live instance in `state` for the listeners in `wants` (and its cache when
/// `cache`). None when no instance answers; stale sockets of dead instances are removed.
pub fn request(state: &StateDir, wants: &[(Kind, SocketAddr)], cache: bool) -> Option<Handed> {
    for path in state.handover_candidates() {
        match request_from(&path, wants, cache) {
            Ok(h) => return Some(h),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                ) =>
            {
                debug!(socket = %path.display(), "removing the handover socket of an instance that is gone");
                let _ = std::fs::remove_file(&path);
            }
            Err(e) => {
                warn!(socket = %path.display(), error = %e, "handover failed; trying the next instance or binding anew");
            }
        }
    }
    None
}

fn request_from(
    path: &std::path::Path,
    wants: &[(Kind, SocketAddr)],
    cache: bool,
) -> io::Result<Handed> {
    let chan = Channel::connect(path, STEP_TIMEOUT)?;
    let mut hello = format!("H{VERSION}\n");
    for (k, a) in wants {
        hello.push_str(&format!("{} {a}\n", k.name()));
    }
    if cache {
        hello.push_str("cache\n");
    }
    chan.send(hello.as_bytes(), &[])?;
    let mut buf = vec![0u8; MAX_MSG];
    let mut listeners = Vec::new();
    loop {
        let (n, fds) = chan.recv(&mut buf)?;
        match buf.get(..n) {
            Some(b"E") => break,
            Some([b'F', rest @ ..]) => {
                let text = std::str::from_utf8(rest).map_err(|_| bad("bad listener message"))?;
                let (k, a) = text
                    .split_once(' ')
                    .ok_or_else(|| bad("bad listener message"))?;
                let kind = Kind::parse(k).ok_or_else(|| bad("unknown listener kind"))?;
                let addr: SocketAddr = a.parse().map_err(|_| bad("bad listener address"))?;
                if !wants.contains(&(kind, addr)) {
                    return Err(bad("offered a listener that was not asked for"));
                }
                listeners.extend(fds.into_iter().map(|fd| (kind, addr, fd)));
            }
            _ => return Err(bad("unexpected message while receiving listeners")),
        }
    }
    let mut snapshot = None;
    if cache {
        let mut bytes = Vec::new();
        loop {
            let (n, _) = chan.recv(&mut buf)?;
            match buf.get(..n) {
                Some(b"D") => break,
                Some([b'C', rest @ ..]) => bytes.extend_from_slice(rest),
                _ => return Err(bad("unexpected message while receiving the cache")),
            }
        }
        snapshot = Some(bytes).filter(|b| !b.is_empty());
    }
    Ok(Handed {
        listeners,
        cache: snapshot,
        from: path.to_owned(),
        chan,
    })
}
