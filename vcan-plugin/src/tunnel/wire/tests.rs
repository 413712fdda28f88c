use super::*;
use proptest::prelude::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("test hex"))
        .collect()
}

fn packet(seq: u8, frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    let n = Encoder::new(DEFAULT_PAYLOAD_LIMIT)
        .expect("limit")
        .encode(seq, frames, &mut out);
    assert_eq!(n, frames.len(), "all frames fit");
    out
}

fn frames_of(bytes: &[u8]) -> (u8, Vec<Frame>) {
    let p = decode(bytes).expect("valid packet");
    (p.seq(), p.frames().collect())
}

fn classic_std() -> Frame {
    Frame::classic(0x123, &[0x11, 0x22, 0x33]).expect("frame")
}
fn extended() -> Frame {
    Frame::classic(
        CAN_EFF_FLAG | 0x123_4567,
        &[0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4],
    )
    .expect("frame")
}
fn remote() -> Frame {
    Frame::remote(0x7ff, 4).expect("frame")
}
fn error_frame() -> Frame {
    Frame::classic(CAN_ERR_FLAG | 0x4, &[0, 4, 0, 0, 0, 0, 0, 0]).expect("frame")
}
fn fd12() -> Frame {
    let data: Vec<u8> = (0..12).collect();
    Frame::fd(0xab, CANFD_BRS | CANFD_ESI, &data).expect("frame")
}
fn fd64() -> Frame {
    let data: Vec<u8> = (0..64).map(|i| 0xff - i).collect();
    Frame::fd(CAN_EFF_FLAG | 0x18da_f110, CANFD_BRS, &data).expect("frame")
}
fn zero_len() -> Frame {
    Frame::classic(0, &[]).expect("frame")
}

// Golden vectors: what cannelloni 2.1.2's own buildPacket() produced for the same frames (a
// throwaway harness outside the repository called it from libcannelloni-common; see
// tests/tunnel_corpus/MANIFEST). Interop over real sockets is left to the VM tests.
const GOLDEN_CLASSIC: &str = "02000700010000012303112233";
const GOLDEN_EXTENDED: &str = "02000800018123456708deadbeef01020304";
const GOLDEN_REMOTE: &str = "0200090001400007ff04";
const GOLDEN_ERROR: &str = "02000a000120000004080004000000000000";
const GOLDEN_FD: &str = "02000b0001000000ab8c03000102030405060708090a0b";
const GOLDEN_MIXED: &str = "0200ff0007\
    0000012303112233\
    8123456708deadbeef01020304\
    400007ff04\
    20000004080004000000000000\
    000000ab8c03000102030405060708090a0b\
    98daf110c001fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0efeeedecebeae9e8e7e6e5e4e3e2e1e0dfdedddcdbdad9d8\
    d7d6d5d4d3d2d1d0cfcecdcccbcac9c8c7c6c5c4c3c2c1c0\
    0000000000";

#[test]
fn classic_standard_bytes() {
    assert_eq!(packet(7, &[classic_std()]), hex(GOLDEN_CLASSIC));
    assert_eq!(frames_of(&hex(GOLDEN_CLASSIC)), (7, vec![classic_std()]));
}

#[test]
fn extended_bytes() {
    assert_eq!(packet(8, &[extended()]), hex(GOLDEN_EXTENDED));
    let (_, frames) = frames_of(&hex(GOLDEN_EXTENDED));
    assert!(frames[0].is_extended());
    assert_eq!(frames, vec![extended()]);
}

#[test]
fn remote_has_length_but_no_data_bytes() {
    assert_eq!(packet(9, &[remote()]), hex(GOLDEN_REMOTE));
    let (_, frames) = frames_of(&hex(GOLDEN_REMOTE));
    assert!(frames[0].is_remote());
    assert_eq!(frames[0].len(), 4);
    assert_eq!(frames[0].data(), &[] as &[u8]);
    assert_eq!(frames[0].wire_len(), 5);
}

#[test]
fn classic_with_rtr_flag_drops_its_data() {
    let f = Frame::classic(CAN_RTR_FLAG | 0x10, &[1, 2]).expect("frame");
    assert_eq!(f, Frame::remote(0x10, 2).expect("frame"));
}

#[test]
fn error_flag_is_kept() {
    assert_eq!(packet(10, &[error_frame()]), hex(GOLDEN_ERROR));
    let (_, frames) = frames_of(&hex(GOLDEN_ERROR));
    assert!(frames[0].is_error());
    assert_eq!(frames[0].id(), 0x2000_0004);
}

#[test]
fn fd_with_brs_and_esi() {
    assert_eq!(packet(11, &[fd12()]), hex(GOLDEN_FD));
    let (_, frames) = frames_of(&hex(GOLDEN_FD));
    assert_eq!(frames[0].fd_flags(), Some(CANFD_BRS | CANFD_ESI));
    assert_eq!(frames[0].len(), 12);
}

#[test]
fn mixed_batch() {
    let all = [
        classic_std(),
        extended(),
        remote(),
        error_frame(),
        fd12(),
        fd64(),
        zero_len(),
    ];
    assert_eq!(packet(255, &all), hex(GOLDEN_MIXED));
    assert_eq!(frames_of(&hex(GOLDEN_MIXED)), (255, all.to_vec()));
}

#[test]
fn empty_packet() {
    assert_eq!(packet(0, &[]), hex("0200000000"));
    let bytes = hex("0200000000");
    let p = decode(&bytes).expect("valid");
    assert!(p.is_empty());
    assert_eq!(p.frames().count(), 0);
}

#[test]
fn encoder_stops_before_a_frame_that_does_not_fit() {
    // cannelloni with a 100-byte payload put the 75-byte FD frame and the 8-byte classic one in,
    // and left the second FD frame for the next packet.
    let enc = Encoder::new(100).expect("limit");
    let frames = [fd64(), classic_std(), fd64()];
    let mut out = Vec::new();
    assert_eq!(enc.encode(1, &frames, &mut out), 2);
    assert_eq!(
        out,
        hex(
            "020001000298daf110c001fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0efeeedecebeae9e8e7e6e5e4e3e2e1\
             e0dfdedddcdbdad9d8d7d6d5d4d3d2d1d0cfcecdcccbcac9c8c7c6c5c4c3c2c1c00000012303112233"
        )
    );
    assert_eq!(enc.encode(2, &frames[2..], &mut out), 1);
    assert_eq!(out.len(), HEADER_LEN + MAX_FRAME_WIRE_LEN);
}

#[test]
fn encoder_limits() {
    assert_eq!(
        Encoder::new(MIN_PAYLOAD_LIMIT - 1),
        Err(EncodeError::Limit(MIN_PAYLOAD_LIMIT - 1))
    );
    assert!(Encoder::new(MIN_PAYLOAD_LIMIT).is_ok());
    assert!(Encoder::new(MAX_PACKET_LEN).is_ok());
    assert!(Encoder::new(MAX_PACKET_LEN + 1).is_err());
}

#[test]
fn frame_constructors_check_lengths() {
    assert_eq!(
        Frame::classic(1, &[0; 9]),
        Err(FrameError::ClassicLength(9))
    );
    assert_eq!(Frame::remote(1, 9), Err(FrameError::ClassicLength(9)));
    for len in 0..=CANFD_MAX_DLEN + 1 {
        let r = Frame::fd(1, 0, &vec![0; len]);
        assert_eq!(r.is_ok(), is_fd_len(len), "len {len}");
    }
    assert_eq!(Frame::fd(CAN_RTR_FLAG, 0, &[]), Err(FrameError::FdRemote));
}

#[test]
fn kernel_can_frame_layout() {
    let mut raw = [0u8; CAN_MTU];
    raw[..4].copy_from_slice(&(CAN_EFF_FLAG | 0x1234_5678 & 0x1fff_ffff).to_ne_bytes());
    raw[4] = 3;
    raw[7] = 9; // len8_dlc: dropped
    raw[8..11].copy_from_slice(&[0xaa, 0xbb, 0xcc]);
    let f = Frame::from_can_frame(&raw).expect("frame");
    assert_eq!(f.id(), 0x9234_5678);
    assert_eq!(f.data(), &[0xaa, 0xbb, 0xcc]);
    let mut buf = [0xee; CANFD_MTU];
    let out = f.to_kernel(&mut buf);
    raw[7] = 0;
    assert_eq!(out, &raw);
    assert_eq!(Frame::from_kernel(&raw), Ok(f));
}

#[test]
fn kernel_can_frame_rejects_long_classic() {
    let mut raw = [0u8; CAN_MTU];
    raw[4] = 9;
    assert_eq!(
        Frame::from_can_frame(&raw),
        Err(FrameError::ClassicLength(9))
    );
}

#[test]
fn kernel_remote_frame_keeps_length() {
    let mut raw = [0u8; CAN_MTU];
    raw[..4].copy_from_slice(&(CAN_RTR_FLAG | 0x7ff).to_ne_bytes());
    raw[4] = 4;
    raw[8] = 0x55; // garbage in a remote frame's data: not carried
    let f = Frame::from_can_frame(&raw).expect("frame");
    assert_eq!(f, remote());
    let mut buf = [0; CANFD_MTU];
    raw[8] = 0;
    assert_eq!(f.to_kernel(&mut buf), &raw);
}

#[test]
fn kernel_canfd_frame_layout() {
    let f = fd12();
    let mut buf = [0; CANFD_MTU];
    let out = f.to_kernel(&mut buf).to_vec();
    assert_eq!(out.len(), CANFD_MTU);
    assert_eq!(&out[..4], &0xabu32.to_ne_bytes());
    assert_eq!(out[4], 12);
    assert_eq!(out[5], CANFD_BRS | CANFD_ESI);
    assert_eq!(&out[6..8], &[0, 0]);
    assert_eq!(&out[8..20], &(0..12).collect::<Vec<u8>>()[..]);
    assert!(out[20..].iter().all(|&b| b == 0));
    assert_eq!(Frame::from_kernel(&out), Ok(f));
}

#[test]
fn kernel_canfd_frame_pads_to_fd_size() {
    let mut raw = [0u8; CANFD_MTU];
    raw[4] = 13;
    raw[8..21].fill(0x77);
    raw[30] = 0x99; // beyond len: not carried
    let f = Frame::from_canfd_frame(&raw).expect("frame");
    assert_eq!(f.len(), 16);
    assert_eq!(&f.data()[..13], &[0x77; 13]);
    assert_eq!(&f.data()[13..], &[0, 0, 0]);
    raw[4] = 65;
    assert_eq!(Frame::from_canfd_frame(&raw), Err(FrameError::FdLength(65)));
}

#[test]
fn kernel_size_is_checked() {
    assert_eq!(
        Frame::from_kernel(&[0; 17]),
        Err(FrameError::KernelSize(17))
    );
}

#[test]
fn display_notation() {
    assert_eq!(classic_std().to_string(), "00000123#112233");
    assert_eq!(remote().to_string(), "400007FF#R4");
    assert_eq!(
        Frame::fd(0x80, 1, &[0xaa, 0xbb])
            .expect("frame")
            .to_string(),
        "00000080##01AABB"
    );
}

fn err(bytes: &[u8]) -> &'static str {
    match decode(bytes) {
        Ok(p) => panic!("decoded {p:?}"),
        Err(e) => e.label(),
    }
}

#[test]
fn every_error_class() {
    assert_eq!(err(&hex("020000")), "truncated");
    assert_eq!(err(&[]), "truncated");
    assert_eq!(err(&hex("0100000000")), "version");
    assert_eq!(err(&hex("0201000000")), "op_code");
    assert_eq!(err(&hex("0200000002 0000012300")), "frame_count_overrun");
    assert_eq!(err(&hex("0200000000 00")), "trailing_bytes");
    assert_eq!(err(&hex("0200000001 0000012300 00")), "trailing_bytes");
    // two frames need at least 10 bytes after the header
    assert_eq!(
        err(&hex("0200000002 0000012300 00000123")),
        "frame_count_overrun"
    );
    // enough bytes for two minimal frames, but the first is longer
    assert_eq!(err(&hex("0200000002 0000012302 11 00000123")), "truncated");
    assert_eq!(err(&hex("0200000001 0000012308 11223344")), "truncated");
    // the FD flags byte itself missing
    assert_eq!(err(&hex("0200000001 0000012380")), "truncated");
    assert_eq!(
        err(&hex("0200000001 0000012309 112233445566778899")),
        "bad_length"
    );
    assert_eq!(err(&hex("0200000001 400001230900 000000")), "bad_length");
    assert_eq!(err(&hex("0200000001 000001238d00 00000000")), "bad_length");
    assert_eq!(err(&hex("0200000001 00000123c100 00000000")), "bad_length");
    assert_eq!(err(&hex("0200000001 4000012380 00")), "fd_remote");
    let mut big = vec![0; MAX_PACKET_LEN + 1];
    big[..5].copy_from_slice(&[2, 0, 0, 0, 0]);
    assert_eq!(err(&big), "oversized");
    assert!(WireError::LABELS.iter().all(|l| !l.is_empty()));
}

#[test]
fn largest_packet_is_not_oversized() {
    let enc = Encoder::new(MAX_PACKET_LEN).expect("limit");
    let frames = vec![fd64(); 2000];
    let mut out = Vec::new();
    let n = enc.encode(3, &frames, &mut out);
    assert_eq!(n, (MAX_PACKET_LEN - HEADER_LEN) / MAX_FRAME_WIRE_LEN);
    assert_eq!(decode(&out).map(|p| p.len()), Ok(n));
}

// ─── Properties ───────────────────────────────────────────────────────────────────────────

const FD_SIZES: [usize; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64];

fn arb_id() -> impl Strategy<Value = u32> {
    prop_oneof![
        0u32..0x800,
        (0u32..0x2000_0000).prop_map(|id| id | CAN_EFF_FLAG),
        (0u32..0x2000_0000).prop_map(|id| id | CAN_ERR_FLAG),
        any::<u32>().prop_map(|id| id & !CAN_RTR_FLAG),
    ]
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (arb_id(), proptest::collection::vec(any::<u8>(), 0..=8))
            .prop_map(|(id, data)| Frame::classic(id, &data).expect("valid classic")),
        (arb_id(), 0usize..=8).prop_map(|(id, len)| Frame::remote(id, len).expect("valid remote")),
        (
            arb_id(),
            any::<u8>(),
            proptest::sample::select(&FD_SIZES[..]),
            any::<[u8; 64]>()
        )
            .prop_map(
                |(id, flags, len, data)| Frame::fd(id, flags, &data[..len]).expect("valid fd")
            ),
    ]
}

fn arb_packet() -> impl Strategy<Value = Vec<u8>> {
    (any::<u8>(), proptest::collection::vec(arb_frame(), 0..20)).prop_map(|(seq, frames)| {
        let mut out = Vec::new();
        Encoder::new(DEFAULT_PAYLOAD_LIMIT)
            .expect("limit")
            .encode(seq, &frames, &mut out);
        out
    })
}

proptest! {
    #[test]
    fn encode_decode_round_trips(seq: u8, frames in proptest::collection::vec(arb_frame(), 0..20)) {
        let out = packet(seq, &frames);
        prop_assert_eq!(out.len(), HEADER_LEN + frames.iter().map(Frame::wire_len).sum::<usize>());
        let p = decode(&out).expect("own packet decodes");
        prop_assert_eq!(p.seq(), seq);
        prop_assert_eq!(p.len(), frames.len());
        prop_assert_eq!(p.frames().collect::<Vec<_>>(), frames);
    }

    #[test]
    fn kernel_round_trips(frame in arb_frame()) {
        let mut buf = [0; CANFD_MTU];
        let raw = frame.to_kernel(&mut buf).to_vec();
        prop_assert_eq!(Frame::from_kernel(&raw), Ok(frame));
    }

    #[test]
    fn decode_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(p) = decode(&bytes) {
            prop_assert_eq!(p.frames().count(), p.len());
        }
    }

    #[test]
    fn decode_plausible_headers_never_panics(
        count in 0u16..40,
        body in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        // Arbitrary bytes rarely get past version and op code; these always do.
        let mut bytes = vec![VERSION, OP_DATA, 0];
        bytes.extend_from_slice(&count.to_be_bytes());
        bytes.extend_from_slice(&body);
        if let Ok(p) = decode(&bytes) {
            prop_assert_eq!(p.frames().count(), p.len());
        }
    }

    #[test]
    fn mutated_packets_never_panic(packet in arb_packet(), at: prop::sample::Index, byte: u8) {
        let mut bytes = packet;
        let i = at.index(bytes.len());
        bytes[i] = byte;
        if let Ok(p) = decode(&bytes) {
            prop_assert_eq!(p.frames().count(), p.len());
        }
    }

    #[test]
    fn truncated_packets_fail(packet in arb_packet(), at: prop::sample::Index) {
        let cut = at.index(packet.len());
        // Every strict prefix of a valid packet is invalid: the count no longer matches.
        prop_assert!(decode(&packet[..cut]).is_err());
    }

    #[test]
    fn encoder_never_exceeds_limit(
        limit in MIN_PAYLOAD_LIMIT..2000usize,
        frames in proptest::collection::vec(arb_frame(), 0..100),
    ) {
        let enc = Encoder::new(limit).expect("limit");
        let mut out = Vec::new();
        let mut rest = &frames[..];
        let mut seen = Vec::new();
        let mut seq = 0u8;
        loop {
            let n = enc.encode(seq, rest, &mut out);
            prop_assert!(out.len() <= limit);
            let p = decode(&out).expect("own packet decodes");
            seen.extend(p.frames());
            if rest.is_empty() {
                break;
            }
            prop_assert!(n >= 1);
            // Greedy: the next frame would not have fitted.
            if let Some(next) = rest.get(n) {
                prop_assert!(out.len() + next.wire_len() > limit);
            }
            rest = &rest[n..];
            seq = seq.wrapping_add(1);
        }
        prop_assert_eq!(seen, frames);
    }
}
