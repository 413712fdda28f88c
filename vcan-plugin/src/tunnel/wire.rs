//! cannelloni's UDP packet format, version 2, written from its specification
//! (`doc/udp_format.md` of cannelloni 2.1.2) so that a tunnel end here and a real cannelloni
//! can talk to each other.
//!
//! A packet is a 5-byte header — version `2`, op code `0` (DATA), a sequence number (u8, wraps)
//! and a frame count (u16) — followed by that many frames, each the kernel's `canid_t` (flag bits
//! included), a length byte, for CAN FD a flags byte, and the data. Everything is big-endian.
//! The length byte of a CAN FD frame has its top bit ([`CANFD_FRAME`]) set; remote (RTR) frames
//! keep their length but carry no data bytes.
//!
//! The decoder is stricter than cannelloni's: cannelloni accepts classic lengths up to 64, FD
//! lengths that are no DLC size, trailing bytes and anything after a zero count, and reads the FD
//! flags byte without checking it is there. Whatever this decoder accepts, a cannelloni peer
//! accepts too, and everything a well-behaved peer sends decodes here. Each way an input can be
//! wrong is its own [`WireError`] so that a metrics layer can count them apart.
//!
//! Decoding allocates nothing: [`decode`] checks the whole packet and returns a [`Packet`] that
//! borrows the input and yields its frames one by one.

use std::fmt;

/// The only protocol version there is (cannelloni's `CANNELLONI_FRAME_VERSION`).
pub const VERSION: u8 = 2;
/// Op code of a data packet; cannelloni defines ACK and NACK but never sends them over UDP.
pub const OP_DATA: u8 = 0;
/// Bytes of the packet header: version, op code, sequence number, frame count (u16).
pub const HEADER_LEN: usize = 5;
/// Bytes of a frame before its (optional) flags and data: `canid_t` and the length byte.
pub const FRAME_HEADER_LEN: usize = 5;
/// Top bit of a frame's length byte: the frame is CAN FD and a flags byte follows.
pub const CANFD_FRAME: u8 = 0x80;
/// Bytes of the largest frame on the wire: a CAN FD frame with 64 data bytes.
pub const MAX_FRAME_WIRE_LEN: usize = FRAME_HEADER_LEN + 1 + CANFD_MAX_DLEN;
/// The smallest payload limit an [`Encoder`] takes: room for the header and one frame of any
/// kind, so that every call makes progress.
pub const MIN_PAYLOAD_LIMIT: usize = HEADER_LEN + MAX_FRAME_WIRE_LEN;
/// Payload limit for the common 1500-byte MTU over IPv4 (minus 20 bytes of IP and 8 of UDP
/// header); cannelloni's default.
pub const DEFAULT_PAYLOAD_LIMIT: usize = 1500 - 20 - 8;
/// The largest input [`decode`] considers: the largest payload a single UDP datagram can carry
/// over any IP version without IPv6 jumbograms (65535 − 8 bytes of UDP header; IPv4 allows even
/// 20 bytes less). Larger inputs did not come from one datagram; cannelloni's own lengths are
/// 16-bit and its largest MTU (65535) leaves at most 65507 bytes of payload. The frame count
/// bounds nothing useful here: 65535 frames of 70 bytes would be 4.5 MB.
pub const MAX_PACKET_LEN: usize = 65_535 - 8;

pub use crate::kernel::frame::{
    CAN_EFF_FLAG, CAN_ERR_FLAG, CAN_MAX_DLEN, CAN_MTU, CAN_RTR_FLAG, CANFD_BRS, CANFD_ESI,
    CANFD_MAX_DLEN, CANFD_MTU,
};

// Offsets shared by both kernel structs: can_id (host order), len, then flags (FD only) or
// padding, two reserved bytes, and the data at 8 (the data is 8-byte aligned).
const KERNEL_LEN: usize = 4;
const KERNEL_FLAGS: usize = 5;
const KERNEL_DATA: usize = 8;

/// Whether `len` is a length a CAN FD frame can have: the DLC sizes 0..=8, 12, 16, 20, 24, 32,
/// 48, 64.
pub fn is_fd_len(len: usize) -> bool {
    matches!(len, 0..=8 | 12 | 16 | 20 | 24 | 32 | 48 | 64)
}

/// The smallest CAN FD length at least `len`, as a CAN FD controller pads a frame to the next
/// DLC size; `None` above 64.
fn fd_len_padded(len: usize) -> Option<usize> {
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64]
        .into_iter()
        .find(|&size| size >= len)
}

/// Why a [`Frame`] could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A classic frame (data or remote) has at most 8 bytes.
    #[error("classic CAN frame of length {0}: at most 8")]
    ClassicLength(usize),
    /// A CAN FD frame has 0..=8, 12, 16, 20, 24, 32, 48 or 64 bytes.
    #[error("CAN FD frame of length {0}: not a CAN FD size (0-8, 12, 16, 20, 24, 32, 48, 64)")]
    FdLength(usize),
    /// CAN FD has no remote frames; cannelloni would send one without data, and guessing what
    /// the sender meant is worse than refusing it.
    #[error("CAN FD frame with the RTR flag: CAN FD has no remote frames")]
    FdRemote,
    /// A kernel frame is 16 (`can_frame`) or 72 (`canfd_frame`) bytes.
    #[error("{0} bytes are neither a can_frame (16) nor a canfd_frame (72)")]
    KernelSize(usize),
}

/// One CAN frame as the tunnel carries it: classic (data or remote) or CAN FD.
///
/// Invariants, kept by the constructors so that `==` compares what matters: `len` is valid for
/// the kind, data bytes beyond `len` are zero, and a remote frame's data bytes are all zero.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    id: u32,
    fd: Option<u8>,
    len: u8,
    data: [u8; CANFD_MAX_DLEN],
}

impl Frame {
    /// A classic frame. `id` is the kernel's `canid_t` with its flags; with [`CAN_RTR_FLAG`] set
    /// the frame is a remote frame of length `data.len()` whose data is dropped (remote frames
    /// carry none), as for [`Frame::remote`].
    pub fn classic(id: u32, data: &[u8]) -> Result<Frame, FrameError> {
        if data.len() > CAN_MAX_DLEN {
            return Err(FrameError::ClassicLength(data.len()));
        }
        let mut frame = Frame::empty(id, None, data.len());
        if id & CAN_RTR_FLAG == 0 {
            frame.data[..data.len()].copy_from_slice(data);
        }
        Ok(frame)
    }

    /// A classic remote frame (RTR) asking for `len` bytes; [`CAN_RTR_FLAG`] is added to `id`.
    pub fn remote(id: u32, len: usize) -> Result<Frame, FrameError> {
        if len > CAN_MAX_DLEN {
            return Err(FrameError::ClassicLength(len));
        }
        Ok(Frame::empty(id | CAN_RTR_FLAG, None, len))
    }

    /// A CAN FD frame with `flags` ([`CANFD_BRS`], [`CANFD_ESI`]; other bits are passed through
    /// untouched, as cannelloni does, e.g. the kernel's `CANFD_FDF`).
    pub fn fd(id: u32, flags: u8, data: &[u8]) -> Result<Frame, FrameError> {
        if id & CAN_RTR_FLAG != 0 {
            return Err(FrameError::FdRemote);
        }
        if !is_fd_len(data.len()) {
            return Err(FrameError::FdLength(data.len()));
        }
        let mut frame = Frame::empty(id, Some(flags), data.len());
        frame.data[..data.len()].copy_from_slice(data);
        Ok(frame)
    }

    fn empty(id: u32, fd: Option<u8>, len: usize) -> Frame {
        Frame {
            id,
            fd,
            // Every caller checked len <= 64.
            len: u8::try_from(len).unwrap_or(u8::MAX),
            data: [0; CANFD_MAX_DLEN],
        }
    }

    /// The kernel's `canid_t`: identifier and the EFF/RTR/ERR flags.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The CAN FD flags; `None` for a classic frame.
    pub fn fd_flags(&self) -> Option<u8> {
        self.fd
    }

    /// Whether this is a CAN FD frame.
    pub fn is_fd(&self) -> bool {
        self.fd.is_some()
    }

    /// Whether this is a remote frame (RTR).
    pub fn is_remote(&self) -> bool {
        self.id & CAN_RTR_FLAG != 0
    }

    /// Whether the identifier is extended (29 bits).
    pub fn is_extended(&self) -> bool {
        self.id & CAN_EFF_FLAG != 0
    }

    /// Whether this is an error message frame.
    pub fn is_error(&self) -> bool {
        self.id & CAN_ERR_FLAG != 0
    }

    /// The frame's length: its data bytes, or for a remote frame the length it asks for.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Whether the length is zero.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The data bytes; empty for a remote frame.
    pub fn data(&self) -> &[u8] {
        if self.is_remote() {
            &[]
        } else {
            &self.data[..self.len()]
        }
    }

    /// Bytes this frame takes in a packet.
    pub fn wire_len(&self) -> usize {
        FRAME_HEADER_LEN + usize::from(self.fd.is_some()) + self.data().len()
    }

    /// The frame from a kernel `struct can_frame` (CAN_RAW, classic). `len8_dlc` (DLC 9..15 of
    /// a classic frame with 8 bytes) is dropped: cannelloni has no room for it.
    pub fn from_can_frame(raw: &[u8; CAN_MTU]) -> Result<Frame, FrameError> {
        let len = usize::from(raw[KERNEL_LEN]);
        let data = raw
            .get(KERNEL_DATA..KERNEL_DATA + len)
            .ok_or(FrameError::ClassicLength(len))?;
        Frame::classic(kernel_id(raw), data)
    }

    /// The frame from a kernel `struct canfd_frame` (CAN_RAW with `CAN_RAW_FD_FRAMES`). A length
    /// that is no CAN FD size is padded with zeros to the next one, as a CAN FD controller does
    /// on the bus; a virtual CAN interface passes such lengths through, the wire format does not.
    pub fn from_canfd_frame(raw: &[u8; CANFD_MTU]) -> Result<Frame, FrameError> {
        let len = usize::from(raw[KERNEL_LEN]);
        let padded = fd_len_padded(len).ok_or(FrameError::FdLength(len))?;
        let mut data = [0; CANFD_MAX_DLEN];
        data[..len].copy_from_slice(&raw[KERNEL_DATA..KERNEL_DATA + len]);
        Frame::fd(kernel_id(raw), raw[KERNEL_FLAGS], &data[..padded])
    }

    /// The frame from what a CAN_RAW socket read: a `can_frame` or a `canfd_frame`, told apart
    /// by their size as the kernel does.
    pub fn from_kernel(raw: &[u8]) -> Result<Frame, FrameError> {
        if let Ok(classic) = <&[u8; CAN_MTU]>::try_from(raw) {
            Frame::from_can_frame(classic)
        } else if let Ok(fd) = <&[u8; CANFD_MTU]>::try_from(raw) {
            Frame::from_canfd_frame(fd)
        } else {
            Err(FrameError::KernelSize(raw.len()))
        }
    }

    /// The frame as the kernel struct to write to a CAN_RAW socket: the first 16 bytes of `buf`
    /// (`can_frame`) for a classic frame, all 72 (`canfd_frame`) for CAN FD.
    pub fn to_kernel<'b>(&self, buf: &'b mut [u8; CANFD_MTU]) -> &'b [u8] {
        *buf = [0; CANFD_MTU];
        buf[..4].copy_from_slice(&self.id.to_ne_bytes());
        buf[KERNEL_LEN] = self.len;
        // Reserved bytes and can_frame's len8_dlc stay zero; data beyond len is zero already.
        let size = match self.fd {
            Some(flags) => {
                buf[KERNEL_FLAGS] = flags;
                CANFD_MTU
            }
            None => CAN_MTU,
        };
        buf[KERNEL_DATA..size].copy_from_slice(&self.data[..size - KERNEL_DATA]);
        &buf[..size]
    }

    /// Appends the frame's wire bytes to `out`.
    fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.to_be_bytes());
        match self.fd {
            Some(flags) => out.extend_from_slice(&[self.len | CANFD_FRAME, flags]),
            None => out.push(self.len),
        }
        out.extend_from_slice(self.data());
    }
}

fn kernel_id(raw: &[u8]) -> u32 {
    let mut id = [0; 4];
    id.copy_from_slice(&raw[..4]);
    u32::from_ne_bytes(id)
}

/// Like candump's notation, but the identifier is always the full `canid_t` in 8 hex digits
/// (flags included) and CAN FD flags are two hex digits: `00000123#1122`, `400007FF#R4`,
/// `800000AB##03AABB`.
impl fmt::Display for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}#", self.id)?;
        if let Some(flags) = self.fd {
            write!(f, "#{flags:02X}")?;
        }
        if self.is_remote() {
            write!(f, "R{}", self.len)?;
        }
        for byte in self.data() {
            write!(f, "{byte:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Frame({self})")
    }
}

/// Why an [`Encoder`] could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The payload limit must leave room for the header and the largest frame, and no packet
    /// may exceed what the decoder accepts.
    #[error(
        "payload limit {0}: must be between {MIN_PAYLOAD_LIMIT} (header and one CAN FD frame) \
         and {MAX_PACKET_LEN} (largest UDP payload)"
    )]
    Limit(usize),
}

/// Builds packets of at most a given size from a queue of frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoder {
    limit: usize,
}

impl Encoder {
    /// An encoder whose packets are at most `limit` bytes: the path MTU minus IP and UDP
    /// headers, e.g. [`DEFAULT_PAYLOAD_LIMIT`]. Below [`MIN_PAYLOAD_LIMIT`] a large frame might
    /// never fit, so that is refused rather than left to stall the sender.
    pub fn new(limit: usize) -> Result<Encoder, EncodeError> {
        if (MIN_PAYLOAD_LIMIT..=MAX_PACKET_LEN).contains(&limit) {
            Ok(Encoder { limit })
        } else {
            Err(EncodeError::Limit(limit))
        }
    }

    /// The payload limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Replaces `out` with one packet numbered `seq` holding as many of `frames`, from the
    /// front and in order, as fit in the limit (no frame is ever split), and returns how many
    /// went in: at least one unless `frames` is empty, when `out` is a packet with no frames
    /// (which cannelloni ignores; there is no reason to send it).
    pub fn encode(&self, seq: u8, frames: &[Frame], out: &mut Vec<u8>) -> usize {
        out.clear();
        out.extend_from_slice(&[VERSION, OP_DATA, seq, 0, 0]);
        let mut count: u16 = 0;
        for frame in frames {
            // The limit bounds the count far below u16::MAX (13104 frames of 5 bytes), but
            // the header must never disagree with the body.
            if out.len() + frame.wire_len() > self.limit || count == u16::MAX {
                break;
            }
            frame.encode_into(out);
            count += 1;
        }
        out[3..HEADER_LEN].copy_from_slice(&count.to_be_bytes());
        usize::from(count)
    }
}

/// What is wrong with a packet: one variant per thing a metrics layer counts apart, named by
/// [`WireError::label`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Larger than [`MAX_PACKET_LEN`], the most one UDP datagram carries.
    #[error("packet of {0} bytes: larger than any UDP datagram ({MAX_PACKET_LEN})")]
    Oversized(usize),
    /// The header or a frame is cut short.
    #[error("packet cut short: {needed} bytes needed at offset {offset}, {len} in the packet")]
    Truncated {
        /// Where the cut-short part starts.
        offset: usize,
        /// Bytes that part needs.
        needed: usize,
        /// Bytes in the packet.
        len: usize,
    },
    /// Not version 2.
    #[error("protocol version {0}: only version {VERSION} exists")]
    Version(u8),
    /// Not a DATA packet.
    #[error("op code {0}: only DATA ({OP_DATA}) is sent over UDP")]
    OpCode(u8),
    /// The frame count claims more frames than the packet's bytes could hold even if every frame
    /// were as short as possible (5 bytes).
    #[error("frame count {count}: {len} bytes after the header hold at most {max}")]
    FrameCountOverrun {
        /// The count in the header.
        count: u16,
        /// Bytes after the header.
        len: usize,
        /// Most frames that many bytes hold.
        max: usize,
    },
    /// Bytes are left after the counted frames.
    #[error("{0} bytes after the last counted frame")]
    TrailingBytes(usize),
    /// A frame's length byte is no valid length: above 8 for a classic frame, no CAN FD size
    /// for a CAN FD frame.
    #[error("frame at offset {offset}: length byte {byte:#04x} is no valid length")]
    BadLength {
        /// Where the frame starts.
        offset: usize,
        /// The length byte, CAN FD bit included.
        byte: u8,
    },
    /// A CAN FD frame with the RTR flag (see [`FrameError::FdRemote`]).
    #[error("frame at offset {offset}: CAN FD frame with the RTR flag")]
    FdRemote {
        /// Where the frame starts.
        offset: usize,
    },
}

impl WireError {
    /// Every value [`WireError::label`] returns, e.g. to initialise a metric's series.
    pub const LABELS: [&'static str; 8] = [
        "oversized",
        "truncated",
        "version",
        "op_code",
        "frame_count_overrun",
        "trailing_bytes",
        "bad_length",
        "fd_remote",
    ];

    /// A short, fixed name for the kind of error, fit for a metric label.
    pub fn label(&self) -> &'static str {
        match self {
            WireError::Oversized(_) => "oversized",
            WireError::Truncated { .. } => "truncated",
            WireError::Version(_) => "version",
            WireError::OpCode(_) => "op_code",
            WireError::FrameCountOverrun { .. } => "frame_count_overrun",
            WireError::TrailingBytes(_) => "trailing_bytes",
            WireError::BadLength { .. } => "bad_length",
            WireError::FdRemote { .. } => "fd_remote",
        }
    }
}

/// A packet [`decode`] found valid: its sequence number and frames, read from the input on
/// demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    seq: u8,
    count: u16,
    body: &'a [u8],
}

impl<'a> Packet<'a> {
    /// The sender's sequence number.
    pub fn seq(&self) -> u8 {
        self.seq
    }

    /// How many frames the packet holds.
    pub fn len(&self) -> usize {
        usize::from(self.count)
    }

    /// Whether the packet holds no frames.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The frames, in the order sent.
    pub fn frames(&self) -> Frames<'a> {
        Frames {
            body: self.body,
            offset: HEADER_LEN,
            remaining: self.count,
        }
    }
}

/// Iterator over the frames of a [`Packet`].
#[derive(Debug, Clone)]
pub struct Frames<'a> {
    /// The whole packet, so that offsets match those in errors.
    body: &'a [u8],
    offset: usize,
    remaining: u16,
}

impl Iterator for Frames<'_> {
    type Item = Frame;

    fn next(&mut self) -> Option<Frame> {
        if self.remaining == 0 {
            return None;
        }
        // decode checked every frame; an error here cannot happen, and ending early is the
        // harmless answer if it ever did.
        let (frame, size) = parse_frame(self.body, self.offset).ok()?;
        self.offset += size;
        self.remaining -= 1;
        Some(frame)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = usize::from(self.remaining);
        (n, Some(n))
    }
}

impl ExactSizeIterator for Frames<'_> {}

/// Checks a whole packet and returns it; every way it can be wrong is a [`WireError`]. Never
/// panics, never allocates, and reads each byte at most once (frames again when iterated).
pub fn decode(bytes: &[u8]) -> Result<Packet<'_>, WireError> {
    if bytes.len() > MAX_PACKET_LEN {
        return Err(WireError::Oversized(bytes.len()));
    }
    let [version, op_code, seq, hi, lo, ..] = *bytes else {
        return Err(WireError::Truncated {
            offset: 0,
            needed: HEADER_LEN,
            len: bytes.len(),
        });
    };
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    if op_code != OP_DATA {
        return Err(WireError::OpCode(op_code));
    }
    let count = u16::from_be_bytes([hi, lo]);
    // Checked before any frame so that a lying count is named as such, not as a truncated
    // frame somewhere, and so that the work is bounded by the input's size.
    let body_len = bytes.len() - HEADER_LEN;
    let max = body_len / FRAME_HEADER_LEN;
    if usize::from(count) > max {
        return Err(WireError::FrameCountOverrun {
            count,
            len: body_len,
            max,
        });
    }
    let mut offset = HEADER_LEN;
    for _ in 0..count {
        let (_, size) = parse_frame(bytes, offset)?;
        offset += size;
    }
    if offset != bytes.len() {
        return Err(WireError::TrailingBytes(bytes.len() - offset));
    }
    Ok(Packet {
        seq,
        count,
        body: bytes,
    })
}

/// The frame at `offset` of `packet` and the bytes it takes.
fn parse_frame(packet: &[u8], offset: usize) -> Result<(Frame, usize), WireError> {
    let truncated = |needed| WireError::Truncated {
        offset,
        needed,
        len: packet.len(),
    };
    let rest = packet.get(offset..).unwrap_or_default();
    let [a, b, c, d, len_byte, ..] = *rest else {
        return Err(truncated(FRAME_HEADER_LEN));
    };
    let id = u32::from_be_bytes([a, b, c, d]);
    let fd = len_byte & CANFD_FRAME != 0;
    let len = usize::from(len_byte & !CANFD_FRAME);
    let valid = if fd {
        is_fd_len(len)
    } else {
        len <= CAN_MAX_DLEN
    };
    if !valid {
        return Err(WireError::BadLength {
            offset,
            byte: len_byte,
        });
    }
    let remote = id & CAN_RTR_FLAG != 0;
    if fd && remote {
        return Err(WireError::FdRemote { offset });
    }
    let head = FRAME_HEADER_LEN + usize::from(fd);
    let size = head + if remote { 0 } else { len };
    let frame_bytes = rest.get(..size).ok_or_else(|| truncated(size))?;
    let frame = if fd {
        Frame::fd(id, frame_bytes[FRAME_HEADER_LEN], &frame_bytes[head..])
    } else if remote {
        Frame::remote(id, len)
    } else {
        Frame::classic(id, &frame_bytes[head..])
    };
    // The checks above are exactly the constructors'; map rather than unwrap all the same.
    let frame = frame.map_err(|_| WireError::BadLength {
        offset,
        byte: len_byte,
    })?;
    Ok((frame, size))
}

#[cfg(test)]
mod tests;
