//! The exact number of bits a CAN frame occupies on the wire, stuff bits included.
//!
//! A timed bus holds the wire for as long as a real one would, so it needs each frame's real
//! length rather than a worst-case estimate: the stuff bits depend on the frame's bit pattern,
//! and for a classic frame on its CRC too.
//!
//! What is counted, for every frame: start of frame through end of frame (the 7 recessive EOF
//! bits), plus the 3-bit intermission of the interframe space. Not counted: bus idle, the 8-bit
//! suspend transmission of an error-passive transmitter, error and overload frames, and
//! retransmissions. The ACK slot is one bit (a receiver is assumed to acknowledge).
//!
//! References, part by part:
//!
//! - Classic frames (base and extended format, data and remote) follow can-utils' exact mode
//!   (`canframelen.c`, `CFL_EXACT`, used by `canbusload -e`): the same span (SOF through the
//!   last CRC bit with its stuff bits, then CRC delimiter, ACK slot, ACK delimiter, EOF and 3
//!   intermission bits), CRC-15 (polynomial 0x4599, initial value 0) over the unstuffed bits
//!   from SOF through the data field, stuffing from SOF through the CRC sequence, a stuff bit
//!   after the last CRC bit when that bit completes a run of five. One deliberate difference:
//!   can-utils gives a remote frame a data field of its DLC's length; ISO 11898-1 gives remote
//!   frames no data field, and this module follows ISO (the two agree for DLC 0).
//! - CAN FD frames follow ISO 11898-1:2015, because can-utils' exact mode returns 0 for them
//!   and its other modes follow the pre-ISO Bosch format (no stuff count, no fixed stuff bits).
//!   Fields: SOF, identifier (with SRR, IDE and the id extension in the extended format), RRS,
//!   IDE (base format), FDF, res, BRS, ESI, DLC, data; then the CRC field: the 4-bit stuff
//!   count (3 Gray-coded bits and a parity bit), the CRC sequence (CRC-17 up to 16 data bytes,
//!   CRC-21 above), a fixed stuff bit before the stuff count and after every 4 bits of the CRC
//!   field (6 fixed stuff bits with CRC-17, 7 with CRC-21); then CRC delimiter, ACK slot, ACK
//!   delimiter, EOF and intermission as for classic frames. Dynamic stuffing runs from SOF
//!   through the last data bit; a run of five ending on that bit gets no dynamic stuff bit, the
//!   fixed stuff bit that follows does its job. Because every bit after the data field is
//!   counted at a fixed rate, an FD frame's length does not depend on its CRC or stuff count,
//!   and neither is computed. ESI is taken as dominant (an error-active transmitter; a
//!   `WireFrame` does not carry ESI): a recessive ESI could change which bits get stuffed.
//! - The phase split of a CAN FD frame with bit-rate switch: the bitrate switches at the
//!   sample point of BRS and back at the sample point of the CRC delimiter, so each of those
//!   two bits is partly in each phase. The common model, used here, counts BRS at the nominal
//!   rate and the CRC delimiter at the data rate: `data` is ESI through the CRC delimiter, with
//!   the stuff bits in that span; `nominal` is SOF through BRS plus ACK slot, ACK delimiter, EOF
//!   and intermission. (can-utils' `can_frame_dbitrate_length` counts one "brs/crcdel" bit in
//!   the data phase, the same total.)
//!
//! Inputs are taken the way SocketCAN carries them and never make this panic: a classic payload
//! longer than 8 bytes counts its first 8, an FD payload longer than 64 its first 64, an FD
//! length between two DLC lengths is padded to the next one with zero bytes (what the kernel's
//! `can_fd_len2dlc` implies; the padding value is the controller's, zeros are the common case).

use std::time::Duration;

/// Extended frame format flag of a SocketCAN id word.
const CAN_EFF_FLAG: u32 = 0x8000_0000;
/// Remote transmission request flag.
const CAN_RTR_FLAG: u32 = 0x4000_0000;
/// Error message frame flag.
const CAN_ERR_FLAG: u32 = 0x2000_0000;
const CAN_EFF_MASK: u32 = 0x1FFF_FFFF;
const CAN_SFF_MASK: u32 = 0x7FF;

/// ACK slot, ACK delimiter, 7 EOF bits and 3 intermission bits: always at the nominal rate.
const ACK_EOF_IFS: u32 = 1 + 1 + 7 + 3;

/// Bits of one frame: those sent at the nominal (arbitration) bitrate and those sent at the
/// data bitrate (the data phase of a CAN FD frame with bit-rate switch; 0 otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FrameBits {
    /// Bits at the nominal bitrate.
    pub nominal: u32,
    /// Bits at the data bitrate: ESI through the CRC delimiter of a CAN FD frame with BRS.
    pub data: u32,
}

/// A frame as it reaches the scheduler.
///
/// `can_id` is the raw SocketCAN id word (CAN_EFF_FLAG 0x8000_0000, CAN_RTR_FLAG 0x4000_0000,
/// CAN_ERR_FLAG 0x2000_0000 included), `data` the payload (its length is the frame's length:
/// 0..=8 classic, one of the FD lengths 0..=8, 12, 16, 20, 24, 32, 48, 64 for FD), `fd`
/// whether it is a CAN FD frame, `brs` its bit-rate-switch flag. For a classic remote frame,
/// `dlc` is the requested length (data is empty).
#[derive(Debug, Clone, Copy)]
pub struct WireFrame<'a> {
    /// The SocketCAN id word, flags included.
    pub can_id: u32,
    /// The payload; ignored for a classic remote frame.
    pub data: &'a [u8],
    /// The DLC of a classic remote frame (values above 15 count as 15); ignored otherwise, the
    /// DLC of a data frame follows from `data`'s length.
    pub dlc: u8,
    /// A CAN FD frame (FD frames have no remote form: CAN_RTR_FLAG is then ignored).
    pub fd: bool,
    /// Bit-rate switch; ignored unless `fd`.
    pub brs: bool,
}

/// The frame's exact length on the wire: start of frame through the end of frame, plus the
/// 3-bit intermission, with the stuff bits its actual bit pattern produces (can-utils' exact
/// mode for classic frames, ISO 11898-1:2015 for CAN FD; see the module documentation for
/// what is counted and where each part comes from).
///
/// For a CAN FD frame with `brs`, ESI through the CRC delimiter are counted in
/// [`FrameBits::data`]; every other bit is in [`FrameBits::nominal`].
///
/// Error frames (CAN_ERR_FLAG) are the kernel's reports of bus errors, never frames on a wire:
/// they get [`FrameBits::default()`], zero bits.
pub fn frame_bits(frame: &WireFrame<'_>) -> FrameBits {
    if frame.can_id & CAN_ERR_FLAG != 0 {
        return FrameBits::default();
    }
    if frame.fd {
        fd_frame_bits(frame)
    } else {
        FrameBits {
            nominal: classic_frame_bits(frame),
            data: 0,
        }
    }
}

/// How long the frame occupies the bus at `bitrate` (and `data_bitrate` for the data phase of
/// BRS frames; if None, data-phase bits go at `bitrate`), rounded to the nearest nanosecond.
///
/// A zero `data_bitrate` is treated like None. A zero `bitrate` never finishes sending a bit:
/// the result is [`Duration::MAX`] unless there is nothing to send (bus configurations never
/// have a zero bitrate; this only keeps the function total).
pub fn duration(bits: FrameBits, bitrate: u32, data_bitrate: Option<u32>) -> Duration {
    let data_bitrate = data_bitrate.filter(|&r| r != 0).unwrap_or(bitrate);
    if bitrate == 0 {
        return if bits.nominal == 0 && bits.data == 0 {
            Duration::ZERO
        } else {
            Duration::MAX
        };
    }
    // Both phases over one common denominator, so the result is rounded once, not twice.
    const NS: u128 = 1_000_000_000;
    let (nominal_rate, data_rate) = (u128::from(bitrate), u128::from(data_bitrate));
    let numerator =
        u128::from(bits.nominal) * NS * data_rate + u128::from(bits.data) * NS * nominal_rate;
    let denominator = nominal_rate * data_rate;
    let nanos = (2 * numerator + denominator) / (2 * denominator);
    // At most 2 * u32::MAX seconds' worth of nanoseconds (bits at 1 bit/s), which fits a u64.
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// Counts the bits of the dynamically stuffed part of a frame as they are sent.
///
/// A stuff bit is only decided when the next bit comes (or at the end of the stuffed span),
/// because whether a run of five ending on the span's last bit gets one differs between
/// classic frames (it does) and CAN FD frames (it does not).
struct Stuffer {
    /// Bits sent so far, stuff bits included, the pending one not.
    sent: u32,
    /// The last bit sent (true = recessive); the idle bus before SOF is recessive.
    last: bool,
    /// Length of the run of equal bits ending with `last`, stuff bits counting as run starts.
    run: u8,
    /// The last five bits were equal: a stuff bit goes out before the next bit.
    pending: bool,
}

impl Stuffer {
    fn new() -> Self {
        Self {
            sent: 0,
            last: true,
            run: 0,
            pending: false,
        }
    }

    fn push(&mut self, bit: bool) {
        if self.pending {
            self.pending = false;
            self.sent += 1;
            self.last = !self.last;
            self.run = 1;
        }
        self.sent += 1;
        if bit == self.last {
            self.run += 1;
        } else {
            self.last = bit;
            self.run = 1;
        }
        self.pending = self.run == 5;
    }

    /// Bits of the stuffed span; `stuff_after_last` says whether a run of five ending on the
    /// span's last bit gets its stuff bit.
    fn finish(&self, stuff_after_last: bool) -> u32 {
        self.sent + u32::from(self.pending && stuff_after_last)
    }
}

/// The bits from SOF on, fed to the stuffer and to the classic CRC-15.
struct Encoder {
    stuffer: Stuffer,
    /// CRC-15 of the unstuffed bits so far; only classic frames use it.
    crc: u16,
}

impl Encoder {
    fn new() -> Self {
        Self {
            stuffer: Stuffer::new(),
            crc: 0,
        }
    }

    /// Sends the low `width` bits of `value`, most significant first (CAN's bit order).
    fn field(&mut self, value: u32, width: u32) {
        for i in (0..width).rev() {
            let bit = (value >> i) & 1 == 1;
            let feedback = bit ^ (self.crc & 0x4000 != 0);
            self.crc = (self.crc << 1) & 0x7FFF;
            if feedback {
                self.crc ^= 0x4599;
            }
            self.stuffer.push(bit);
        }
    }

    fn flag(&mut self, bit: bool) {
        self.field(u32::from(bit), 1);
    }
}

fn classic_frame_bits(frame: &WireFrame<'_>) -> u32 {
    let remote = frame.can_id & CAN_RTR_FLAG != 0;
    let payload: &[u8] = if remote {
        &[]
    } else {
        &frame.data[..frame.data.len().min(8)]
    };
    let dlc = if remote {
        frame.dlc.min(15)
    } else {
        // At most 8 here.
        payload.len() as u8
    };

    let mut e = Encoder::new();
    e.flag(false); // SOF
    if frame.can_id & CAN_EFF_FLAG != 0 {
        let id = frame.can_id & CAN_EFF_MASK;
        e.field(id >> 18, 11);
        e.flag(true); // SRR
        e.flag(true); // IDE
        e.field(id & 0x3_FFFF, 18);
        e.flag(remote); // RTR
        e.field(0, 2); // r1, r0
    } else {
        e.field(frame.can_id & CAN_SFF_MASK, 11);
        e.flag(remote); // RTR
        e.field(0, 2); // IDE, r0
    }
    e.field(u32::from(dlc), 4);
    for &byte in payload {
        e.field(u32::from(byte), 8);
    }
    // The CRC sequence is stuffed like the rest but is not part of its own input.
    let crc = e.crc;
    for i in (0..15).rev() {
        e.stuffer.push((crc >> i) & 1 == 1);
    }
    let through_crc = e.stuffer.finish(true);
    through_crc + 1 /* CRC delimiter */ + ACK_EOF_IFS
}

/// The DLC of an FD payload of `len` bytes and the length that DLC sends: lengths between two
/// DLC lengths go up to the next, like the kernel's `can_fd_len2dlc`.
fn fd_dlc(len: usize) -> (u8, usize) {
    match len {
        0..=8 => (len as u8, len),
        9..=12 => (9, 12),
        13..=16 => (10, 16),
        17..=20 => (11, 20),
        21..=24 => (12, 24),
        25..=32 => (13, 32),
        33..=48 => (14, 48),
        _ => (15, 64),
    }
}

fn fd_frame_bits(frame: &WireFrame<'_>) -> FrameBits {
    let (dlc, len) = fd_dlc(frame.data.len());

    let mut e = Encoder::new();
    e.flag(false); // SOF
    if frame.can_id & CAN_EFF_FLAG != 0 {
        let id = frame.can_id & CAN_EFF_MASK;
        e.field(id >> 18, 11);
        e.flag(true); // SRR
        e.flag(true); // IDE
        e.field(id & 0x3_FFFF, 18);
        e.flag(false); // RRS
    } else {
        e.field(frame.can_id & CAN_SFF_MASK, 11);
        e.flag(false); // RRS
        e.flag(false); // IDE
    }
    e.flag(true); // FDF
    e.flag(false); // res
    e.flag(frame.brs);
    // Stuff bits sent so far precede the switch; a stuff bit still pending after BRS would
    // follow its sample point, in the data phase.
    let through_brs = e.stuffer.sent;
    e.flag(false); // ESI
    e.field(u32::from(dlc), 4);
    for &byte in frame.data.iter().chain(std::iter::repeat(&0)).take(len) {
        e.field(u32::from(byte), 8);
    }
    let dynamic = e.stuffer.finish(false);

    let crc_len: u32 = if len <= 16 { 17 } else { 21 };
    let crc_field = 4 + crc_len;
    let fixed_stuff = crc_field.div_ceil(4);
    let crc_field_and_delimiter = crc_field + fixed_stuff + 1;

    if frame.brs {
        FrameBits {
            nominal: through_brs + ACK_EOF_IFS,
            data: dynamic - through_brs + crc_field_and_delimiter,
        }
    } else {
        FrameBits {
            nominal: dynamic + crc_field_and_delimiter + ACK_EOF_IFS,
            data: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn classic(can_id: u32, data: &[u8]) -> u32 {
        let bits = frame_bits(&WireFrame {
            can_id,
            data,
            dlc: data.len() as u8,
            fd: false,
            brs: false,
        });
        assert_eq!(bits.data, 0);
        bits.nominal
    }

    fn remote(can_id: u32, dlc: u8) -> u32 {
        let bits = frame_bits(&WireFrame {
            can_id: can_id | CAN_RTR_FLAG,
            data: &[],
            dlc,
            fd: false,
            brs: false,
        });
        assert_eq!(bits.data, 0);
        bits.nominal
    }

    fn fd(can_id: u32, data: &[u8], brs: bool) -> FrameBits {
        frame_bits(&WireFrame {
            can_id,
            data,
            dlc: data.len() as u8,
            fd: true,
            brs,
        })
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("test literal is hex"))
            .collect()
    }

    /// `(can_id, payload in hex, bits)`: the bits are can-utils' exact mode
    /// (`can_frame_length(frame, CFL_EXACT, CAN_MTU)` from `canframelen.c`, linux-can/can-utils
    /// 95aae6bf), compiled and run on these frames.
    const CAN_UTILS_EXACT: &[(u32, &str, u32)] = &[
        (0x000, "0000000000000000", 127),
        (0x000, "5555555555555555", 114),
        (0x000, "ffffffffffffffff", 127),
        (0x7FF, "0000000000000000", 126),
        (0x7FF, "5555555555555555", 113),
        (0x7FF, "ffffffffffffffff", 126),
        (0x123, "0000000000000000", 125),
        (0x123, "5555555555555555", 112),
        (0x123, "ffffffffffffffff", 124),
        (0x123, "1122334455667788", 112),
        (0x7E0, "0200000000000000", 126),
        (0x018, "aa", 58),
        (0x123, "", 48),
        (0x000, "", 53),
        (0x7FF, "", 50),
        (0x8000_0000, "", 74),
        (0x8000_0000, "0000000000000000", 150),
        (0x9FFF_FFFF, "ffffffffffffffff", 149),
        (0x9234_5678, "5555555555555555", 132),
        (0x9234_5678, "deadbeefcafebabe", 136),
        (0x9234_5678, "", 69),
        // Random frames, biased towards 0x00 and 0xff bytes so that stuffing matters.
        (0x287, "9eff", 65),
        (0x483, "0091f8ba0097", 99),
        (0x16B, "ff00", 66),
        (0x150, "0000ff00e100ff00", 121),
        (0x833E_7548, "461bffff00ffffff", 141),
        (0x87FC_418F, "ff3c00ffffff", 127),
        (0x9F2E_20D3, "0000002700ff", 125),
        (0x1FA, "1d00cf", 75),
        (0x8390_0941, "ff5fffcfff", 116),
        (0x9EBF_0EF6, "ffff00000000ff00", 144),
        (0x3C7, "0000031dd900ffff", 121),
        (0x8A52_D3FB, "ff", 80),
        (0x7CF, "00ff8151c634ff", 108),
        (0x81B1_FAA6, "ff00f084", 105),
        (0x747, "ffffffffff5a84", 111),
        (0x19F, "ff00ff2c", 86),
    ];

    #[test]
    fn classic_frames_match_can_utils_exact_mode() {
        for &(can_id, payload, expected) in CAN_UTILS_EXACT {
            assert_eq!(
                classic(can_id, &hex(payload)),
                expected,
                "{can_id:#x} [{payload}]"
            );
        }
    }

    #[test]
    fn remote_frames_with_dlc_0_match_can_utils_exact_mode() {
        // can-utils' exact mode, as above.
        assert_eq!(remote(0x123, 0), 48);
        assert_eq!(remote(0x7FF, 0), 50);
        assert_eq!(remote(0x8000_0000, 0), 73);
        assert_eq!(remote(0x9234_5678, 0), 69);
    }

    #[test]
    fn remote_frames_have_no_data_field() {
        // Unlike can-utils, which sends DLC bytes of data in a remote frame, nothing follows
        // the DLC but the CRC: unstuffed 47 bits (base) or 67 (extended), whatever the DLC.
        for dlc in 0..=15 {
            let base = remote(0x123, dlc);
            assert!((47..=55).contains(&base), "dlc {dlc}: {base}");
            let extended = remote(0x9234_5678, dlc);
            assert!((67..=80).contains(&extended), "dlc {dlc}: {extended}");
        }
        // Payload bytes passed along with a remote frame are not sent.
        let with_junk = frame_bits(&WireFrame {
            can_id: 0x123 | CAN_RTR_FLAG,
            data: &[0; 8],
            dlc: 8,
            fd: false,
            brs: false,
        });
        assert_eq!(with_junk.nominal, remote(0x123, 8));
    }

    #[test]
    fn classic_standard_8_byte_frames_stay_within_the_known_bounds() {
        // 111 = 47 + 64 unstuffed; 135 = the worst case (34 + 64 - 1) / 4 = 24 stuff bits more.
        for pattern in [0x00, 0x55, 0xAA, 0xFF, 0x0F, 0xF0, 0x3C, 0x80] {
            for id in [0x000, 0x001, 0x0FF, 0x123, 0x555, 0x7FF] {
                let bits = classic(id, &[pattern; 8]);
                assert!((111..=135).contains(&bits), "{id:#x} {pattern:#x}: {bits}");
            }
        }
    }

    #[test]
    fn error_frames_take_no_bits() {
        let bits = frame_bits(&WireFrame {
            can_id: CAN_ERR_FLAG | 0x004,
            data: &[0; 8],
            dlc: 8,
            fd: false,
            brs: false,
        });
        assert_eq!(bits, FrameBits::default());
    }

    #[test]
    fn classic_payload_beyond_8_bytes_counts_8() {
        assert_eq!(classic(0x123, &[0x11; 12]), classic(0x123, &[0x11; 8]));
    }

    /// Hand-counted FD frames: id 0x555 and 0x55 bytes alternate, so the fields before the CRC
    /// field have no run of five and no dynamic stuff bit. SOF through DLC is 22 bits; the CRC
    /// field is 4 + 17 + 6 = 27 bits (CRC-17) or 4 + 21 + 7 = 32 (CRC-21); then the CRC
    /// delimiter and the 12 bits of ACK, EOF and intermission.
    #[test]
    fn fd_frames_hand_counted() {
        let total = |len: usize| fd(0x555, &vec![0x55; len], false).nominal;
        assert_eq!(total(12), 22 + 96 + 27 + 1 + 12);
        assert_eq!(total(16), 22 + 128 + 27 + 1 + 12);
        assert_eq!(total(20), 22 + 160 + 32 + 1 + 12);
        assert_eq!(total(64), 22 + 512 + 32 + 1 + 12);
        // The CRC-17 → CRC-21 switch between 16 and 20 bytes: 32 data bits and 5 CRC field
        // bits (4 CRC bits, 1 fixed stuff bit).
        assert_eq!(total(20) - total(16), 32 + 5);

        // With BRS, SOF through BRS (17 bits) and the 12 trailing bits are nominal.
        for len in [12, 16, 20, 64] {
            let switched = fd(0x555, &vec![0x55; len], true);
            assert_eq!(switched.nominal, 17 + 12, "{len}");
            assert_eq!(switched.nominal + switched.data, total(len), "{len}");
            assert_eq!(fd(0x555, &vec![0x55; len], false).data, 0);
        }
        assert_eq!(fd(0x555, &[0x55; 12], true).data, 5 + 96 + 27 + 1);
    }

    #[test]
    fn fd_run_ending_on_the_last_data_bit_gets_no_dynamic_stuff_bit() {
        // 0x555, BRS, DLC 1, then 0x60 = 0110_0000: five zeros end the data field and the
        // fixed stuff bit before the stuff count takes the dynamic stuff bit's place.
        let last = fd(0x555, &[0x60], true);
        assert_eq!(
            last,
            FrameBits {
                nominal: 29,
                data: 5 + 8 + 27 + 1
            }
        );
        // 0xC1 = 1100_0001: the run of five zeros ends one bit earlier and is stuffed.
        let inside = fd(0x555, &[0xC1], true);
        assert_eq!(
            inside,
            FrameBits {
                nominal: 29,
                data: 5 + 8 + 1 + 27 + 1
            }
        );
    }

    #[test]
    fn fd_lengths_between_dlc_lengths_are_padded() {
        let mut padded = vec![0x12; 13];
        padded.resize(16, 0);
        assert_eq!(fd(0x123, &[0x12; 13], true), fd(0x123, &padded, true));
        assert_eq!(
            fd(0x123, &[0x12; 100], false),
            fd(0x123, &[0x12; 64], false)
        );
    }

    #[test]
    fn fd_ignores_rtr_and_classic_ignores_brs() {
        assert_eq!(
            fd(0x123 | CAN_RTR_FLAG, &[1, 2, 3], false),
            fd(0x123, &[1, 2, 3], false)
        );
        let brs = frame_bits(&WireFrame {
            can_id: 0x123,
            data: &[1, 2, 3],
            dlc: 3,
            fd: false,
            brs: true,
        });
        assert_eq!(
            brs,
            FrameBits {
                nominal: classic(0x123, &[1, 2, 3]),
                data: 0
            }
        );
    }

    #[test]
    fn duration_of_1000_bits_at_125_kbit_is_8_ms() {
        let bits = FrameBits {
            nominal: 1000,
            data: 0,
        };
        assert_eq!(duration(bits, 125_000, None), Duration::from_millis(8));
        assert_eq!(
            duration(bits, 125_000, Some(2_000_000)),
            Duration::from_millis(8)
        );
    }

    #[test]
    fn duration_splits_the_phases() {
        // 0x555 with 12 bytes and BRS: 29 bits at 500 kbit/s (58 µs) and 129 at 2 Mbit/s
        // (64.5 µs).
        let bits = fd(0x555, &[0x55; 12], true);
        assert_eq!(
            bits,
            FrameBits {
                nominal: 29,
                data: 129
            }
        );
        assert_eq!(
            duration(bits, 500_000, Some(2_000_000)),
            Duration::from_nanos(122_500)
        );
        // Without a data bitrate the data phase goes at the nominal rate: 158 bits, 316 µs.
        assert_eq!(duration(bits, 500_000, None), Duration::from_micros(316));
        assert_eq!(duration(bits, 500_000, Some(0)), Duration::from_micros(316));
    }

    #[test]
    fn duration_rounds_to_the_nearest_nanosecond() {
        let bits = |nominal, data| FrameBits { nominal, data };
        assert_eq!(
            duration(bits(1, 0), 3, None),
            Duration::from_nanos(333_333_333)
        );
        assert_eq!(
            duration(bits(2, 0), 3, None),
            Duration::from_nanos(666_666_667)
        );
        // 1/3 s + 1/6 s = exactly 0.5 s: one rounding over both phases, not one per phase.
        assert_eq!(duration(bits(1, 1), 3, Some(6)), Duration::from_millis(500));
        assert_eq!(duration(bits(0, 0), 0, None), Duration::ZERO);
        assert_eq!(duration(bits(1, 0), 0, None), Duration::MAX);
        assert_eq!(
            duration(bits(u32::MAX, u32::MAX), 1, Some(1)),
            Duration::from_secs(2 * u64::from(u32::MAX))
        );
    }

    // ---- An independent bit-level model: build the frame's bits, stuff them, count. ----

    /// Which rate a bit goes at.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Phase {
        Nominal,
        Data,
    }

    fn push(bits: &mut Vec<bool>, value: u64, width: u32) {
        bits.extend((0..width).rev().map(|i| value >> i & 1 == 1));
    }

    /// CRC by polynomial long division of the message times x^15 by the generator.
    fn crc15_by_division(message: &[bool]) -> Vec<bool> {
        let generator: Vec<bool> = (0..16).rev().map(|i| 0xC599u32 >> i & 1 == 1).collect();
        let mut rest = message.to_vec();
        rest.extend([false; 15]);
        for i in 0..message.len() {
            if rest[i] {
                for (j, &g) in generator.iter().enumerate() {
                    rest[i + j] ^= g;
                }
            }
        }
        rest[message.len()..].to_vec()
    }

    /// Inserts a complement after every fifth equal bit sent (a stuff bit is the first bit of
    /// the next run); `after_last` says whether one goes after the last bit too. Returns each
    /// sent bit with whether it is a stuff bit.
    fn stuff(bits: &[bool], after_last: bool) -> Vec<(bool, bool)> {
        let mut out: Vec<(bool, bool)> = Vec::new();
        for (i, &b) in bits.iter().enumerate() {
            out.push((b, false));
            let run = out.iter().rev().take_while(|&&(t, _)| t == b).count();
            if run == 5 && (after_last || i + 1 < bits.len()) {
                out.push((!b, true));
            }
        }
        out
    }

    /// The payload sent and the DLC, interpreting a `WireFrame` as `frame_bits` documents.
    fn model_payload(frame: &WireFrame<'_>) -> (Vec<u8>, u8) {
        if frame.fd {
            let lengths = [0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64];
            let len = frame.data.len().min(64);
            let dlc = lengths.iter().position(|&l| l >= len).unwrap_or(15);
            let mut payload = frame.data[..len].to_vec();
            payload.resize(lengths[dlc], 0);
            (payload, dlc as u8)
        } else if frame.can_id & CAN_RTR_FLAG != 0 {
            (Vec::new(), frame.dlc.min(15))
        } else {
            let payload = frame.data[..frame.data.len().min(8)].to_vec();
            let dlc = payload.len() as u8;
            (payload, dlc)
        }
    }

    fn model(frame: &WireFrame<'_>, fd_crc_value: u32) -> FrameBits {
        if frame.can_id & CAN_ERR_FLAG != 0 {
            return FrameBits::default();
        }
        let (payload, dlc) = model_payload(frame);
        let extended = frame.can_id & CAN_EFF_FLAG != 0;
        let id = u64::from(frame.can_id & if extended { CAN_EFF_MASK } else { CAN_SFF_MASK });
        let remote = !frame.fd && frame.can_id & CAN_RTR_FLAG != 0;

        let mut bits = vec![false]; // SOF
        if extended {
            push(&mut bits, id >> 18, 11);
            push(&mut bits, 0b11, 2); // SRR, IDE
            push(&mut bits, id & 0x3_FFFF, 18);
        } else {
            push(&mut bits, id, 11);
        }
        let brs_at;
        if frame.fd {
            // RRS, (IDE,) FDF, res, BRS, ESI.
            if !extended {
                push(&mut bits, 0b00, 2);
            } else {
                push(&mut bits, 0, 1);
            }
            push(&mut bits, 0b10, 2);
            push(&mut bits, u64::from(frame.brs), 1);
            brs_at = bits.len() - 1;
            push(&mut bits, 0, 1);
        } else {
            push(&mut bits, u64::from(remote), 1);
            push(&mut bits, 0, 2);
            brs_at = usize::MAX;
        }
        push(&mut bits, u64::from(dlc), 4);
        for &byte in &payload {
            push(&mut bits, u64::from(byte), 8);
        }

        if !frame.fd {
            let crc = crc15_by_division(&bits);
            bits.extend(crc);
            let sent = stuff(&bits, true).len() as u32;
            return FrameBits {
                nominal: sent + 1 + 12,
                data: 0,
            };
        }

        // Dynamic stuffing, each sent bit tagged with its phase: a bit sent after BRS (a stuff
        // bit right after it included) is in the data phase. `source` counts the frame's own
        // bits sent before this one.
        let mut sent: Vec<(bool, Phase)> = Vec::new();
        let mut source = 0;
        let mut stuffed = 0u32;
        for (bit, is_stuff) in stuff(&bits, false) {
            let phase = if frame.brs && source > brs_at {
                Phase::Data
            } else {
                Phase::Nominal
            };
            sent.push((bit, phase));
            if is_stuff {
                stuffed += 1;
            } else {
                source += 1;
            }
        }
        // Stuff count: Gray code of the count mod 8, then even parity.
        let gray = (stuffed % 8) ^ ((stuffed % 8) >> 1);
        let parity = gray.count_ones() % 2;
        let crc_len = if payload.len() <= 16 { 17 } else { 21 };
        let mut crc_field = Vec::new();
        push(&mut crc_field, u64::from(gray << 1 | parity), 4);
        push(&mut crc_field, u64::from(fd_crc_value), crc_len);
        let crc_phase = if frame.brs {
            Phase::Data
        } else {
            Phase::Nominal
        };
        let mut previous = sent.last().is_some_and(|&(b, _)| b);
        for (i, &b) in crc_field.iter().enumerate() {
            if i % 4 == 0 {
                previous = !previous;
                sent.push((previous, crc_phase));
            }
            sent.push((b, crc_phase));
            previous = b;
        }
        sent.push((true, crc_phase)); // CRC delimiter
        for _ in 0..12 {
            sent.push((true, Phase::Nominal));
        }
        let count = |p| sent.iter().filter(|&&(_, q)| q == p).count() as u32;
        FrameBits {
            nominal: count(Phase::Nominal),
            data: count(Phase::Data),
        }
    }

    #[test]
    fn model_agrees_with_can_utils() {
        for &(can_id, payload, expected) in CAN_UTILS_EXACT {
            let data = hex(payload);
            let frame = WireFrame {
                can_id,
                data: &data,
                dlc: data.len() as u8,
                fd: false,
                brs: false,
            };
            assert_eq!(
                model(&frame, 0).nominal,
                expected,
                "{can_id:#x} [{payload}]"
            );
        }
    }

    fn byte() -> impl Strategy<Value = u8> {
        // Runs of equal bits are what stuffing is about: plenty of 0x00 and 0xff.
        prop_oneof![Just(0x00), Just(0xFF), any::<u8>()]
    }

    fn can_id() -> impl Strategy<Value = u32> {
        (
            any::<bool>(),
            any::<bool>(),
            any::<u32>(),
            prop_oneof![Just(0u32), Just(CAN_EFF_MASK), any::<u32>()],
        )
            .prop_map(|(extended, rtr, bits, pattern)| {
                let id = if extended {
                    CAN_EFF_FLAG | (bits & pattern & CAN_EFF_MASK)
                } else {
                    bits & pattern & CAN_SFF_MASK
                };
                if rtr { id | CAN_RTR_FLAG } else { id }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn classic_frames_match_the_bit_level_model(
            can_id in can_id(),
            data in proptest::collection::vec(byte(), 0..=8),
            dlc in 0u8..=15,
        ) {
            let frame = WireFrame { can_id, data: &data, dlc, fd: false, brs: false };
            let bits = frame_bits(&frame);
            prop_assert_eq!(bits, model(&frame, 0));
            let (payload, _) = model_payload(&frame);
            let n = payload.len() as u32;
            let (low, high) = if can_id & CAN_EFF_FLAG != 0 { (67, 80) } else { (47, 55) };
            prop_assert!((low + 8 * n..=high + 10 * n).contains(&bits.nominal));
        }

        #[test]
        fn fd_frames_match_the_bit_level_model(
            can_id in can_id(),
            data in proptest::collection::vec(byte(), 0..=64),
            brs in any::<bool>(),
            crc_value in any::<u32>(),
        ) {
            let frame = WireFrame { can_id, data: &data, dlc: 0, fd: true, brs };
            let bits = frame_bits(&frame);
            // Any CRC value gives the same count: the CRC field's stuffing is fixed.
            prop_assert_eq!(bits, model(&frame, crc_value));
            if !brs {
                prop_assert_eq!(bits.data, 0);
            }
        }

        #[test]
        fn any_input_is_counted_without_panicking(
            can_id in any::<u32>(),
            data in proptest::collection::vec(any::<u8>(), 0..=100),
            dlc in any::<u8>(),
            fd in any::<bool>(),
            brs in any::<bool>(),
        ) {
            let frame = WireFrame { can_id, data: &data, dlc, fd, brs };
            prop_assert_eq!(frame_bits(&frame), model(&frame, 0));
        }
    }
}
