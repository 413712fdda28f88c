//! A minimal synchronous netlink client: message building, request/acknowledge and dumps.
//!
//! The plugin needs only a handful of rtnetlink requests (and can-gw's, which use the same framing),
//! so it speaks netlink directly instead of pulling in an async netlink stack. A socket keeps the
//! network namespace it was opened in, which is what lets [`crate::kernel::netns::run`] open it inside a pod's
//! namespace and hand it back.

use std::fmt;
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

/// `NLM_F_CAPPED` on an error message: the echoed request is only its header.
const NLM_F_CAPPED: u16 = 0x100;
/// `NLM_F_ACK_TLVS` on an error message: extended-ack attributes follow the echoed request.
const NLM_F_ACK_TLVS: u16 = 0x200;
/// `NLMSGERR_ATTR_MSG`: the kernel's explanation of an error, a string.
const NLMSGERR_ATTR_MSG: u16 = 1;
/// `NLMSGERR_ATTR_OFFS`: offset in the request of the attribute the kernel rejected, a u32.
const NLMSGERR_ATTR_OFFS: u16 = 2;
/// `NETLINK_CAP_ACK` (linux/netlink.h; not in every libc): errors echo only the request's header.
const NETLINK_CAP_ACK: libc::c_int = 10;

// rtnetlink (linux/rtnetlink.h, linux/if_link.h, linux/if.h): one set for every module that
// speaks it, with the numbers of the uapi headers the 6.1 kernel ships.

/// `RTM_NEWLINK`: create or change a link; also the type of every link in a dump.
pub const RTM_NEWLINK: u16 = 16;
/// `RTM_DELLINK`.
pub const RTM_DELLINK: u16 = 17;
/// `RTM_GETLINK`.
pub const RTM_GETLINK: u16 = 18;
/// `RTM_NEWNSID`: the reply to `RTM_GETNSID`.
pub const RTM_NEWNSID: u16 = 88;
/// `RTM_GETNSID`.
pub const RTM_GETNSID: u16 = 90;
/// `IFF_UP` in `ifinfomsg.ifi_flags`.
pub const IFF_UP: u32 = 0x1;
/// `IFLA_IFNAME`: string.
pub const IFLA_IFNAME: u16 = 3;
/// `IFLA_MTU`: u32.
pub const IFLA_MTU: u16 = 4;
/// `IFLA_LINK`: u32, the index of a link's lower or peer link.
pub const IFLA_LINK: u16 = 5;
/// `IFLA_OPERSTATE`: u8, RFC 2863 operational state (`IF_OPER_*`).
pub const IFLA_OPERSTATE: u16 = 16;
/// `IFLA_LINKINFO`: nest of `IFLA_INFO_*`.
pub const IFLA_LINKINFO: u16 = 18;
/// `IFLA_STATS64`: `struct rtnl_link_stats64`.
pub const IFLA_STATS64: u16 = 23;
/// `IFLA_NET_NS_FD`: u32, a namespace file descriptor to move a link to.
pub const IFLA_NET_NS_FD: u16 = 28;
/// `IFLA_LINK_NETNSID`: s32, the namespace id of the peer link.
pub const IFLA_LINK_NETNSID: u16 = 37;
/// `IFLA_PARENT_DEV_NAME`: string, the device behind the link (e.g. `0000:00:10.0`), since 5.15.
pub const IFLA_PARENT_DEV_NAME: u16 = 56;
/// `IFLA_PARENT_DEV_BUS_NAME`: string, the bus of that device (e.g. `pci`), since 5.15.
pub const IFLA_PARENT_DEV_BUS_NAME: u16 = 57;
/// `IFLA_INFO_KIND` in `IFLA_LINKINFO`: string, the link type (`vcan`, `vxcan`, `can`).
pub const IFLA_INFO_KIND: u16 = 1;
/// `IFLA_INFO_DATA` in `IFLA_LINKINFO`: nest of the link type's own attributes.
pub const IFLA_INFO_DATA: u16 = 2;
/// `IFLA_INFO_XSTATS` in `IFLA_LINKINFO`: the link type's extra statistics.
pub const IFLA_INFO_XSTATS: u16 = 3;
/// `NETNSA_NSID` in `RTM_*NSID`: s32.
pub const NETNSA_NSID: u16 = 1;
/// `NETNSA_FD` in `RTM_GETNSID`: u32, the namespace to look up.
pub const NETNSA_FD: u16 = 3;
/// `VXCAN_INFO_PEER` (linux/can/vxcan.h) in vxcan's `IFLA_INFO_DATA`: a `struct ifinfomsg`
/// followed by the peer's own `IFLA_*` attributes.
pub const VXCAN_INFO_PEER: u16 = 1;

// CAN devices' IFLA_INFO_DATA (linux/can/netlink.h).

/// `IFLA_CAN_BITTIMING`: `struct can_bittiming`.
pub const IFLA_CAN_BITTIMING: u16 = 1;
/// `IFLA_CAN_CLOCK`: `struct can_clock` (one u32, Hz).
pub const IFLA_CAN_CLOCK: u16 = 3;
/// `IFLA_CAN_STATE`: u32, `enum can_state`.
pub const IFLA_CAN_STATE: u16 = 4;
/// `IFLA_CAN_CTRLMODE`: `struct can_ctrlmode`.
pub const IFLA_CAN_CTRLMODE: u16 = 5;
/// `IFLA_CAN_RESTART_MS`: u32.
pub const IFLA_CAN_RESTART_MS: u16 = 6;
/// `IFLA_CAN_BERR_COUNTER`: `struct can_berr_counter`.
pub const IFLA_CAN_BERR_COUNTER: u16 = 8;
/// `IFLA_CAN_DATA_BITTIMING`: `struct can_bittiming` of the CAN FD data phase.
pub const IFLA_CAN_DATA_BITTIMING: u16 = 9;
/// `CAN_CTRLMODE_LISTENONLY`.
pub const CAN_CTRLMODE_LISTENONLY: u32 = 0x02;
/// `CAN_CTRLMODE_FD`.
pub const CAN_CTRLMODE_FD: u32 = 0x20;

/// A request the kernel refused, with its explanation (extended ack) when it gave one.
///
/// [`Socket::transact`] returns it inside an `io::Error` (whose `raw_os_error` is then `None`):
/// read the errno with [`errno`], which works for both kinds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelError {
    /// The positive errno, e.g. `libc::EINVAL`.
    pub errno: i32,
    /// The kernel's message (`NLMSGERR_ATTR_MSG`), if it sent one.
    pub message: Option<String>,
    /// Offset in the request of the attribute the kernel rejected (`NLMSGERR_ATTR_OFFS`).
    pub offset: Option<u32>,
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", io::Error::from_raw_os_error(self.errno))?;
        if let Some(message) = &self.message {
            write!(f, ": the kernel says \"{message}\"")?;
        }
        Ok(())
    }
}

impl std::error::Error for KernelError {}

impl KernelError {
    /// Parses the payload of an `NLMSG_ERROR` message whose header carried `flags`; `None` for an
    /// acknowledgement (error code 0).
    fn parse(payload: &[u8], flags: u16) -> Option<Self> {
        let code = payload
            .get(..4)
            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .unwrap_or(-libc::EIO);
        if code == 0 {
            return None;
        }
        let mut err = KernelError {
            errno: code.checked_neg().filter(|e| *e > 0).unwrap_or(libc::EIO),
            message: None,
            offset: None,
        };
        if flags & NLM_F_ACK_TLVS == 0 {
            return Some(err);
        }
        // The echoed request: only its header when capped, else the whole message.
        let echoed = if flags & NLM_F_CAPPED != 0 {
            NLMSG_HDRLEN
        } else {
            payload
                .get(4..8)
                .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize)
                .unwrap_or(NLMSG_HDRLEN)
        };
        let tlvs = payload.get(4 + align(echoed)..).unwrap_or_default();
        for (kind, data) in attrs(tlvs) {
            match kind {
                NLMSGERR_ATTR_MSG => {
                    let text = attr_string(data);
                    let text = text.trim_end();
                    if !text.is_empty() {
                        err.message = Some(text.to_string());
                    }
                }
                NLMSGERR_ATTR_OFFS => err.offset = attr_u32(data),
                _ => {}
            }
        }
        Some(err)
    }

    fn into_io(self) -> io::Error {
        if self.message.is_none() && self.offset.is_none() {
            // Nothing to add: a plain OS error keeps `raw_os_error` working for every caller.
            return io::Error::from_raw_os_error(self.errno);
        }
        io::Error::new(io::Error::from_raw_os_error(self.errno).kind(), self)
    }
}

/// The errno of an error from [`Socket::transact`] (or any OS error), with or without the kernel's
/// message.
pub fn errno(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<KernelError>())
            .map(|k| k.errno)
    })
}

/// The kernel's explanation of an error from [`Socket::transact`], if it gave one.
pub fn kernel_message(e: &io::Error) -> Option<&str> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<KernelError>())
        .and_then(|k| k.message.as_deref())
}

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

    /// Fills in the length and sequence number and returns the bytes to send (tests compare them).
    pub(crate) fn finish(&mut self, seq: u32) -> &[u8] {
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
        // Errors then echo only the request's header, not the whole (possibly large) request.
        // SAFETY: valid fd and a pointer to a c_int of the advertised size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_NETLINK,
                NETLINK_CAP_ACK,
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
    /// A negative kernel error becomes an `io::Error` with that errno; when the kernel explained it
    /// (extended ack), the error holds a [`KernelError`] with the message instead: match errnos
    /// with [`errno`], not `raw_os_error`.
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
                let flags = u16::from_ne_bytes([data[6], data[7]]);
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
                        return match KernelError::parse(payload, flags) {
                            None => Ok(replies),
                            Some(err) => Err(err.into_io()),
                        };
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

    /// An `NLMSG_ERROR` payload: errno, the echoed request (`echoed` bytes, its length in the
    /// echoed header), then extended-ack attributes.
    fn error_payload(
        errno: i32,
        echoed: usize,
        request_len: u32,
        tlvs: &[(u16, &[u8])],
    ) -> Vec<u8> {
        let mut p = (-errno).to_ne_bytes().to_vec();
        let mut header = vec![0u8; echoed];
        header[..4].copy_from_slice(&request_len.to_ne_bytes());
        p.extend_from_slice(&header);
        for (kind, data) in tlvs {
            p.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
            p.extend_from_slice(&kind.to_ne_bytes());
            p.extend_from_slice(data);
            p.resize(align(p.len()), 0);
        }
        p
    }

    #[test]
    fn the_kernels_message_is_kept_with_the_errno() {
        let tlvs: &[(u16, &[u8])] = &[
            (NLMSGERR_ATTR_MSG, b"bitrate error\0"),
            (NLMSGERR_ATTR_OFFS, &40u32.to_ne_bytes()),
        ];
        // Capped: only the request's header is echoed, whatever its length was.
        let capped = error_payload(libc::EDOM, 16, 96, tlvs);
        let err = KernelError::parse(&capped, NLM_F_CAPPED | NLM_F_ACK_TLVS).expect("an error");
        assert_eq!(
            err,
            KernelError {
                errno: libc::EDOM,
                message: Some("bitrate error".into()),
                offset: Some(40),
            }
        );
        let io = err.into_io();
        assert_eq!(errno(&io), Some(libc::EDOM));
        assert_eq!(kernel_message(&io), Some("bitrate error"));
        assert!(
            io.to_string()
                .ends_with(": the kernel says \"bitrate error\""),
            "{io}"
        );
        // Not capped: the whole 38-byte request is echoed (padded to 40) before the attributes.
        let whole = error_payload(libc::EINVAL, 40, 38, tlvs);
        let err = KernelError::parse(&whole, NLM_F_ACK_TLVS).expect("an error");
        assert_eq!(err.message.as_deref(), Some("bitrate error"));
    }

    #[test]
    fn errors_without_a_message_stay_plain_os_errors() {
        let plain = error_payload(libc::EEXIST, 16, 16, &[]);
        let io = KernelError::parse(&plain, NLM_F_CAPPED)
            .expect("an error")
            .into_io();
        assert_eq!(io.raw_os_error(), Some(libc::EEXIST));
        assert_eq!(errno(&io), Some(libc::EEXIST));
        assert_eq!(kernel_message(&io), None);
        assert!(
            KernelError::parse(&0i32.to_ne_bytes(), 0).is_none(),
            "an ack"
        );
        // A truncated error still reports an error rather than an acknowledgement.
        let err = KernelError::parse(&[], NLM_F_ACK_TLVS).expect("an error");
        assert_eq!(err.errno, libc::EIO);
    }

    #[test]
    fn truncated_attributes_stop_the_iterator() {
        let data = [200u8, 0, 3, 0, b'x'];
        assert_eq!(attrs(&data).count(), 0);
    }
}
