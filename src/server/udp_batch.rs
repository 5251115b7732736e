//! The buffers of a UDP worker's system calls: a batch of client datagrams read with one
//! `recvmmsg` and their replies sent with one `sendmmsg` (`Batch`), and the replies to the misses
//! the worker finished, sent together (`Replies`).

use std::io;
use std::net::SocketAddr;

use crate::dns;

/// Largest query read into a batch slot. A longer datagram (MSG_TRUNC) is not a query we serve:
/// real queries are a few hundred bytes at most.
pub(super) const SLOT_LEN: usize = 4096;

/// Replies to misses the worker finished, for one `sendmmsg`.
#[derive(Default)]
pub(super) struct Replies {
    out: Vec<Vec<u8>>,
    to: Vec<socket2::SockAddr>,
    len: usize,
    iov: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

/// Buffers for one `recvmmsg`/`sendmmsg` round, allocated once per worker.
pub(super) struct Batch {
    pub(super) bufs: Vec<[u8; SLOT_LEN]>,
    pub(super) peers: Vec<libc::sockaddr_storage>,
    pub(super) iov: Vec<libc::iovec>,
    pub(super) hdrs: Vec<libc::mmsghdr>,
    /// Headers the last `recvmmsg` may have written to (it rewrites the name length and flags of
    /// each datagram it fills); only these are reset before the next one.
    filled: usize,
    /// Replies of this round, one per slot (capacity kept between rounds).
    pub(super) out: Vec<Vec<u8>>,
    /// Send descriptors: reply iovecs and headers pointing at `out` and `peers`.
    pub(super) out_iov: Vec<libc::iovec>,
    pub(super) out_hdrs: Vec<libc::mmsghdr>,
    /// Each datagram after parsing, between the two passes over the batch.
    pub(super) slots: Vec<Slot>,
}

/// A datagram of the batch after the first pass.
// The Query stays inline: slots are allocated once per worker and reused.
#[allow(clippy::large_enum_variant)]
pub(super) enum Slot {
    /// Nothing more to do; `reply`: `out[i]` holds an error reply to send.
    Done { reply: bool },
    /// A query to answer from the cache or forward.
    Query {
        q: dns::Query,
        key: u64,
        src: SocketAddr,
    },
}

/// A `T` whose bytes are all zero.
///
/// # Safety
/// All-zero bytes must be a valid `T` (true of C structs made of integers and raw pointers; false
/// of references, `NonNull`, enums without a zero variant, and most Rust types).
pub(super) unsafe fn zeroed<T>() -> T {
    // SAFETY: the caller promises that all-zero bytes are a valid T.
    unsafe { std::mem::zeroed() }
}

impl Batch {
    pub(super) fn new(n: usize) -> Self {
        let mut b = Batch {
            bufs: vec![[0u8; SLOT_LEN]; n],
            // SAFETY: sockaddr_storage is a C struct of integers (family, padding).
            peers: vec![unsafe { zeroed::<libc::sockaddr_storage>() }; n],
            // SAFETY: iovec is a C struct of a raw pointer and a length; null and 0 are valid.
            iov: vec![unsafe { zeroed::<libc::iovec>() }; n],
            // SAFETY: mmsghdr is a C struct of integers and raw pointers (msghdr, msg_len).
            hdrs: vec![unsafe { zeroed::<libc::mmsghdr>() }; n],
            out: (0..n).map(|_| Vec::with_capacity(1232)).collect(),
            // SAFETY: as `iov` above.
            out_iov: vec![unsafe { zeroed::<libc::iovec>() }; n],
            // SAFETY: as `hdrs` above.
            out_hdrs: vec![unsafe { zeroed::<libc::mmsghdr>() }; n],
            slots: (0..n).map(|_| Slot::Done { reply: false }).collect(),
            filled: n,
        };
        // The receive headers point at the slots' buffers and address slots once and for all:
        // the vectors never grow, so their elements never move.
        for i in 0..n {
            b.iov[i] = libc::iovec {
                iov_base: b.bufs[i].as_mut_ptr().cast(),
                iov_len: SLOT_LEN,
            };
            let h = &mut b.hdrs[i].msg_hdr;
            h.msg_name = (&mut b.peers[i] as *mut libc::sockaddr_storage).cast();
            h.msg_iov = &mut b.iov[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
        }
        b
    }

    /// Receives up to a batch of datagrams; blocks (up to the socket's read timeout) for the first
    /// unless `flags` has `MSG_DONTWAIT`.
    pub(super) fn recv(&mut self, fd: i32, flags: libc::c_int) -> io::Result<usize> {
        let n = self.bufs.len();
        // Only the headers the last call filled were written to (a datagram costs one header, not
        // the whole batch: a worker woken for one query touches one). The pointers set in `new`
        // are never written by the kernel.
        for h in &mut self.hdrs[..self.filled] {
            h.msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        // SAFETY: every header points at live buffers of the stated sizes owned by `self`, which
        // outlives the call; the kernel writes at most those sizes.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_WAITFORONE | flags,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            // Nothing received; reset every header next time all the same.
            self.filled = n;
            return Err(io::Error::last_os_error());
        }
        self.filled = r as usize;
        Ok(r as usize)
    }

    /// The sender of slot `i`.
    pub(super) fn peer(&self, i: usize) -> Option<SocketAddr> {
        let len = self.hdrs[i].msg_hdr.msg_namelen as usize;
        let ss = &self.peers[i];
        match ss.ss_family as libc::c_int {
            libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
                // SAFETY: the kernel wrote a sockaddr_in (family AF_INET, length checked) and
                // sockaddr_storage is large and aligned enough for it.
                let a =
                    unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
                let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                Some(SocketAddr::new(ip.into(), u16::from_be(a.sin_port)))
            }
            libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
                // SAFETY: as above, for a sockaddr_in6.
                let a =
                    unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
                let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
                Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                    ip,
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }

    /// Sends `out[i]` to `peers[i]` for every slot in `slots` with one `sendmmsg` (more calls only
    /// if the kernel takes part of the batch).
    pub(super) fn send(&mut self, fd: i32, slots: &[usize]) -> io::Result<()> {
        for (k, &i) in slots.iter().enumerate() {
            self.out_iov[k] = libc::iovec {
                iov_base: self.out[i].as_mut_ptr().cast(),
                iov_len: self.out[i].len(),
            };
            let h = &mut self.out_hdrs[k].msg_hdr;
            h.msg_name = (&mut self.peers[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = self.hdrs[i].msg_hdr.msg_namelen;
            h.msg_iov = &mut self.out_iov[k];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
        }
        let out = &mut self.out;
        send_all(
            fd,
            &mut self.out_hdrs[..slots.len()],
            &mut self.out_iov,
            |k| {
                let reply = &mut out[slots[k]];
                dns::truncate_reply(reply);
                reply.len()
            },
        )
    }
}

/// Sends every message of `hdrs` (each with one iovec, `iov[k]`) with `sendmmsg`, calling again
/// for the rest when the kernel takes part. A reply longer than the interface MTU (EMSGSIZE: the
/// socket sets DF) is cut once to a TC=1 reply by `truncate(k)`, which returns its new length;
/// a datagram the kernel refuses otherwise (an unreachable peer) is skipped.
fn send_all(
    fd: i32,
    hdrs: &mut [libc::mmsghdr],
    iov: &mut [libc::iovec],
    mut truncate: impl FnMut(usize) -> usize,
) -> io::Result<()> {
    let mut sent = 0;
    // The message already cut down to a TC=1 reply after EMSGSIZE, so it is cut only once.
    let mut truncated = usize::MAX;
    while sent < hdrs.len() {
        // SAFETY: headers [sent, len) point at live buffers and addresses the caller owns,
        // unchanged during the call.
        let r = unsafe {
            libc::sendmmsg(
                fd,
                hdrs[sent..].as_mut_ptr(),
                (hdrs.len() - sent) as libc::c_uint,
                0,
            )
        };
        if r <= 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if e.raw_os_error() == Some(libc::EMSGSIZE) && truncated != sent {
                // Longer than the interface MTU and DF is set: send TC=1 instead.
                iov[sent].iov_len = truncate(sent);
                truncated = sent;
                continue;
            }
            // Skip the datagram the kernel refused (e.g. an unreachable peer) and go on.
            sent += 1;
            if sent >= hdrs.len() {
                return Err(e);
            }
            continue;
        }
        sent += r as usize;
    }
    Ok(())
}

impl Replies {
    /// The buffer for the next reply (emptied), its capacity kept from earlier rounds.
    pub(super) fn next(&mut self) -> &mut Vec<u8> {
        if self.len == self.out.len() {
            self.out.push(Vec::with_capacity(512));
        }
        let b = &mut self.out[self.len];
        b.clear();
        b
    }

    /// Queues the buffer [`next`](Self::next) gave, to go to `to`.
    pub(super) fn push(&mut self, to: SocketAddr) {
        let to = socket2::SockAddr::from(to);
        match self.to.get_mut(self.len) {
            Some(slot) => *slot = to,
            None => self.to.push(to),
        }
        self.len += 1;
    }

    /// Sends the queued replies and empties the queue.
    pub(super) fn send(&mut self, fd: i32) {
        let n = std::mem::take(&mut self.len);
        if n == 0 {
            return;
        }
        // SAFETY: iovec and mmsghdr are C structs of integers and raw pointers; zero is valid.
        self.iov.resize(n, unsafe { zeroed() });
        // SAFETY: as above.
        self.hdrs.resize(n, unsafe { zeroed() });
        for k in 0..n {
            self.iov[k] = libc::iovec {
                iov_base: self.out[k].as_mut_ptr().cast(),
                iov_len: self.out[k].len(),
            };
            let h = &mut self.hdrs[k].msg_hdr;
            h.msg_name = self.to[k].as_ptr() as *mut libc::c_void;
            h.msg_namelen = self.to[k].len();
            h.msg_iov = &mut self.iov[k];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
        }
        let out = &mut self.out;
        if let Err(e) = send_all(fd, &mut self.hdrs[..n], &mut self.iov, |k| {
            dns::truncate_reply(&mut out[k]);
            out[k].len()
        }) {
            crate::log_limited!(debug, error = %e, "UDP send failed");
        }
    }
}
