//! A minimal synchronous netlink client: message building, request/acknowledge and dumps.
//!
//! The plugin needs only a handful of rtnetlink requests (and can-gw's, which use the same framing),
//! so it speaks netlink directly instead of pulling in an async netlink stack. A socket keeps the
//! network namespace it was opened in, which is what lets [`crate::kernel::netns::run`] open it inside a pod's
//! namespace and hand it back.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Netlink message header length.
const NLMSG_HDRLEN: usize = 16;
/// `NLMSG_ERROR`: an error or (with code 0) an acknowledgement.
const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`: end of a dump.
const NLMSG_DONE: u16 = 3;

/// `NLM_F_REQUEST`.
pub const NLM_F_REQUEST: u16 = 0x1;
/// `NLM_F_ACK`.
pub const NLM_F_ACK: u16 = 0x4;
/// `NLM_F_DUMP` (`NLM_F_ROOT | NLM_F_MATCH`).
pub const NLM_F_DUMP: u16 = 0x300;
/// `NLM_F_EXCL`.
pub const NLM_F_EXCL: u16 = 0x200;
/// `NLM_F_CREATE`.
pub const NLM_F_CREATE: u16 = 0x400;
/// `NLA_F_NESTED`, set on nested attributes.
pub const NLA_F_NESTED: u16 = 0x8000;

/// Rounds up to netlink's 4-byte alignment.
const fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// A netlink request under construction: header, fixed family header, then attributes.
#[derive(Debug, Clone)]
pub struct Message {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Message {
    /// Starts a message of `kind` with `flags` (NLM_F_REQUEST is added) and a fixed header.
    pub fn new(kind: u16, flags: u16, fixed_header: &[u8]) -> Self {
        let mut buf = vec![0u8; NLMSG_HDRLEN];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        buf[6..8].copy_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        buf.extend_from_slice(fixed_header);
        buf.resize(align(buf.len()), 0);
        Message {
            buf,
            nests: Vec::new(),
        }
    }

    /// Appends an attribute.
    pub fn attr(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        let len = 4 + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align(self.buf.len()), 0);
        self
    }

    /// Appends a NUL-terminated string attribute.
    pub fn attr_str(&mut self, kind: u16, value: &str) -> &mut Self {
        let mut payload = value.as_bytes().to_vec();
        payload.push(0);
        self.attr(kind, &payload)
    }

    /// Appends a native-endian u32 attribute.
    pub fn attr_u32(&mut self, kind: u16, value: u32) -> &mut Self {
        self.attr(kind, &value.to_ne_bytes())
    }

    /// Opens a nested attribute; close it with [`Message::end_nest`].
    pub fn begin_nest(&mut self, kind: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&[0, 0]);
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    /// Closes the innermost nested attribute.
    pub fn end_nest(&mut self) -> &mut Self {
        if let Some(start) = self.nests.pop() {
            let len = (self.buf.len() - start) as u16;
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    fn finish(&mut self, seq: u32) -> &[u8] {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        &self.buf
    }
}

/// One netlink message received in reply: its type and its payload after the netlink header.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The message type, such as `RTM_NEWLINK`.
    pub kind: u16,
    /// The payload: fixed family header followed by attributes.
    pub payload: Vec<u8>,
}

/// Iterates over the attributes in `data` as `(type without flags, payload)`.
pub fn attrs(data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = data;
    std::iter::from_fn(move || {
        if rest.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & !NLA_F_NESTED & !0x4000;
        if len < 4 || len > rest.len() {
            return None;
        }
        let payload = &rest[4..len];
        rest = &rest[align(len).min(rest.len())..];
        Some((kind, payload))
    })
}

/// Reads a NUL-terminated string attribute.
pub fn attr_string(payload: &[u8]) -> String {
    let end = payload
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(payload.len());
    String::from_utf8_lossy(&payload[..end]).into_owned()
}

/// Reads a native-endian u32 attribute, if it is long enough.
pub fn attr_u32(payload: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(payload.get(..4)?.try_into().ok()?))
}

/// A netlink socket of one protocol, bound to the namespace it was opened in.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    /// Opens a netlink socket of `protocol` (e.g. `NETLINK_ROUTE`) in the calling thread's namespace.
    pub fn open(protocol: i32) -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the returned fd is checked and owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a freshly created, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Extended acks make the kernel explain EINVAL-style rejections; failure to enable is harmless.
        let one: libc::c_int = 1;
        // SAFETY: valid fd and a pointer to a c_int of the advertised size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_NETLINK,
                libc::NETLINK_EXT_ACK,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        // A kernel that never answers must not wedge a PreStart call forever.
        let timeout = libc::timeval {
            tv_sec: 10,
            tv_usec: 0,
        };
        // SAFETY: valid fd and a pointer to a timeval of the advertised size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        Ok(Socket { fd, seq: 0 })
    }

    fn send(&mut self, msg: &mut Message) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let bytes = msg.finish(seq);
        // SAFETY: sockaddr_nl zeroed is the kernel address; the buffer outlives the call.
        let rc = unsafe {
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            libc::sendto(
                self.fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(seq)
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: buf is valid for buf.len() bytes.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Sends `msg` and collects replies until the kernel acknowledges it or ends the dump.
    ///
    /// A negative kernel error becomes an `io::Error` with that errno.
    pub fn transact(&mut self, msg: &mut Message) -> io::Result<Vec<Reply>> {
        let seq = self.send(msg)?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut replies = Vec::new();
        loop {
            let n = self.recv(&mut buf)?;
            let mut data = &buf[..n];
            while data.len() >= NLMSG_HDRLEN {
                let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
                let kind = u16::from_ne_bytes([data[4], data[5]]);
                let reply_seq = u32::from_ne_bytes([data[8], data[9], data[10], data[11]]);
                if len < NLMSG_HDRLEN || len > data.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "truncated netlink message",
                    ));
                }
                let payload = &data[NLMSG_HDRLEN..len];
                data = &data[align(len).min(data.len())..];
                if reply_seq != seq {
                    continue;
                }
                match kind {
                    NLMSG_ERROR => {
                        let code = payload
                            .get(..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .unwrap_or(-libc::EIO);
                        if code == 0 {
                            return Ok(replies);
                        }
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    NLMSG_DONE => return Ok(replies),
                    _ => replies.push(Reply {
                        kind,
                        payload: payload.to_vec(),
                    }),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_through_the_parser() {
        let mut msg = Message::new(16, NLM_F_ACK, &[0u8; 16]);
        msg.attr_str(3, "vcan0").attr_u32(4, 72);
        msg.begin_nest(18).attr_str(1, "vcan").end_nest();
        let bytes = msg.finish(7).to_vec();
        assert_eq!(
            u32::from_ne_bytes(bytes[0..4].try_into().expect("header")) as usize,
            bytes.len()
        );
        let parsed: Vec<(u16, Vec<u8>)> = attrs(&bytes[NLMSG_HDRLEN + 16..])
            .map(|(k, p)| (k, p.to_vec()))
            .collect();
        assert_eq!(parsed.len(), 3);
        assert_eq!(attr_string(&parsed[0].1), "vcan0");
        assert_eq!(attr_u32(&parsed[1].1), Some(72));
        assert_eq!(parsed[2].0, 18);
        let nested: Vec<_> = attrs(&parsed[2].1).collect();
        assert_eq!(nested.len(), 1);
        assert_eq!(attr_string(nested[0].1), "vcan");
    }

    #[test]
    fn truncated_attributes_stop_the_iterator() {
        let data = [200u8, 0, 3, 0, b'x'];
        assert_eq!(attrs(&data).count(), 0);
    }
}
