//! Messages with file descriptors attached (`SCM_RIGHTS`) over a Unix `SOCK_SEQPACKET` socket:
//! message boundaries are kept and each message carries its own descriptors.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};

/// Largest message, and the most descriptors one message carries.
pub const MAX_MSG: usize = 64 << 10;
pub const MAX_FDS: usize = 200;

/// Space for the control message of `n` descriptors.
fn cmsg_space(n: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE((n * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// A connected seqpacket socket; blocking, with send and receive timeouts.
pub struct Channel(Socket);

impl Channel {
    pub fn connect(path: &Path, timeout: Duration) -> io::Result<Channel> {
        let s = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.connect(&SockAddr::unix(path)?)?;
        Ok(Channel(s))
    }

    pub fn from_accepted(s: Socket, timeout: Duration) -> io::Result<Channel> {
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(Channel(s))
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.0.set_read_timeout(t)
    }

    /// Sends one message with `fds` attached.
    pub fn send(&self, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
        assert!(data.len() <= MAX_MSG && fds.len() <= MAX_FDS && !data.is_empty());
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let mut control = vec![0u8; cmsg_space(fds.len().max(1))];
        // SAFETY: an all-zero msghdr is valid; every pointer set below points at live buffers of
        // the stated lengths for the duration of the sendmsg call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = cmsg_space(fds.len()) as _;
            // SAFETY: the control buffer holds one cmsghdr plus `fds.len()` descriptors
            // (CMSG_SPACE), so CMSG_FIRSTHDR is non-null and CMSG_DATA has room for them.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr(),
                    libc::CMSG_DATA(c).cast::<RawFd>(),
                    fds.len(),
                );
            }
        }
        loop {
            // SAFETY: msg points at live buffers (see above).
            let rc = unsafe { libc::sendmsg(self.0.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
            if rc >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Receives one message into `buf`; returns its length (0: the peer closed) and the
    /// descriptors it carried, owned by the caller.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut control = vec![0u8; cmsg_space(MAX_FDS)];
        // SAFETY: as in `send`; the kernel writes at most the stated lengths.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len() as _;
        let n = loop {
            // SAFETY: msg points at live buffers owned by this frame.
            let rc = unsafe { libc::recvmsg(self.0.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
            if rc >= 0 {
                break rc as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        let mut fds = Vec::new();
        // SAFETY: the kernel filled msg_control with well-formed cmsghdrs up to msg_controllen;
        // the CMSG_* macros walk exactly those. Each SCM_RIGHTS descriptor is new and ours.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    let p = libc::CMSG_DATA(c).cast::<RawFd>();
                    for i in 0..bytes / std::mem::size_of::<RawFd>() {
                        fds.push(OwnedFd::from_raw_fd(p.add(i).read_unaligned()));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "handover message or its descriptors truncated",
            ));
        }
        Ok((n, fds))
    }
}

/// A listening seqpacket socket at `path` (a stale file there is replaced).
pub fn listen(path: &Path) -> io::Result<Socket> {
    let _ = std::fs::remove_file(path);
    let s = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None)?;
    s.bind(&SockAddr::unix(path)?)?;
    s.listen(8)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn a_message_carries_its_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let l = listen(&path).unwrap();
        let client = Channel::connect(&path, Duration::from_secs(2)).unwrap();
        let (server, _) = l.accept().unwrap();
        let server = Channel::from_accepted(server, Duration::from_secs(2)).unwrap();

        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"shared file").unwrap();
        client.send(b"one", &[f.as_raw_fd()]).unwrap();
        client.send(b"two", &[]).unwrap();
        let mut buf = [0u8; 16];
        let (n, fds) = server.recv(&mut buf).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"one"[..], 1));
        let mut got = std::fs::File::from(fds.into_iter().next().unwrap());
        got.rewind().unwrap();
        let mut text = String::new();
        got.read_to_string(&mut text).unwrap();
        assert_eq!(text, "shared file");
        let (n, fds) = server.recv(&mut buf).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"two"[..], 0));
        drop(client);
        assert_eq!(server.recv(&mut buf).unwrap().0, 0, "peer closed");
    }
}
