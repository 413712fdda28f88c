//! socketcand's protocol against a corpus of client streams — python-can's handshake and sends,
//! socketcand's documented examples, and one stream per way a client can get it wrong — and
//! property tests over arbitrary streams and frames. What each stream gives is in
//! `tests/socketcand_corpus/MANIFEST`.
//!
//! Any input proptest ever shrinks a failure to is added to the corpus, so that it stays tested
//! after proptest's own regression file is gone.
//!
//! Runs on the host: `cargo test -p vcan-plugin --test socketcand_protocol`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proptest::prelude::*;
use vcan_plugin::kernel::frame::{CAN_EFF_FLAG, CAN_EFF_MASK, CAN_SFF_MASK};
use vcan_plugin::socketcand::protocol::{
    Command, MAX_COMMAND_LEN, ProtocolError, Splitter, UNSUPPORTED_COMMANDS, format_frame,
    format_send, parse,
};
use vcan_plugin::tunnel::wire::Frame;

type Item = Result<String, ProtocolError>;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/socketcand_corpus")
}

/// Everything a splitter yields for `bytes` pushed in the given pieces, draining after each push
/// as a server does.
fn split_in_pieces<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> Vec<Item> {
    let mut splitter = Splitter::new();
    let mut items = Vec::new();
    for piece in pieces {
        splitter.push(piece);
        items.extend(splitter.by_ref());
    }
    items
}

fn split_whole(bytes: &[u8]) -> Vec<Item> {
    split_in_pieces([bytes])
}

fn split_bytewise(bytes: &[u8]) -> Vec<Item> {
    split_in_pieces(bytes.chunks(1))
}

/// One splitter item, parsed, in the MANIFEST's notation.
fn describe(item: Item) -> String {
    match item.and_then(|text| parse(&text)) {
        Ok(Command::Open(name)) => format!("cmd:open({name})"),
        Ok(Command::RawMode) => "cmd:rawmode".to_string(),
        Ok(Command::BcmMode) => "cmd:bcmmode".to_string(),
        Ok(Command::ControlMode) => "cmd:controlmode".to_string(),
        Ok(Command::IsotpMode) => "cmd:isotpmode".to_string(),
        Ok(Command::Echo) => "cmd:echo".to_string(),
        Ok(Command::Send(frame)) => format!("cmd:send({frame})"),
        Ok(Command::Unsupported(name)) => format!("cmd:unsupported({name})"),
        Err(ProtocolError::Unknown(word)) => format!("err:unknown_command({word})"),
        Err(ProtocolError::BadArguments { command, .. }) => {
            format!("err:bad_arguments({command})")
        }
        Err(e) => format!("err:{}", e.label()),
    }
}

struct Case {
    file: String,
    expect: Vec<String>,
}

fn manifest() -> Vec<Case> {
    let text = fs::read_to_string(corpus().join("MANIFEST")).expect("MANIFEST");
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|line| {
            let mut words = line.split_whitespace();
            let file = words.next().expect("file").to_string();
            assert!(
                file.ends_with(".txt") || file.ends_with(".bin"),
                "{file}: inputs are .txt or .bin"
            );
            Case {
                file,
                expect: words.map(str::to_string).collect(),
            }
        })
        .collect()
}

#[test]
fn corpus_splits_and_parses_as_the_manifest_says() {
    let mut failures = Vec::new();
    for case in manifest() {
        let path = corpus().join(&case.file);
        let bytes = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if case.file.ends_with(".txt") {
            assert!(
                std::str::from_utf8(&bytes).is_ok(),
                "{}: .txt inputs are UTF-8",
                case.file
            );
        }
        let whole = split_whole(&bytes);
        if split_bytewise(&bytes) != whole {
            failures.push(format!("{}: byte by byte differs from whole", case.file));
        }
        let got: Vec<String> = whole.into_iter().map(describe).collect();
        if got != case.expect {
            failures.push(format!(
                "{}:\n  got      {}\n  expected {}",
                case.file,
                got.join(" "),
                case.expect.join(" ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn manifest_covers_the_corpus_every_error_and_every_unsupported_command() {
    let cases = manifest();
    let listed: BTreeSet<String> = cases.iter().map(|c| c.file.clone()).collect();
    assert_eq!(listed.len(), cases.len(), "a file is listed twice");
    let present: BTreeSet<String> = fs::read_dir(corpus())
        .expect("corpus dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n != "MANIFEST")
        .collect();
    assert_eq!(
        listed, present,
        "MANIFEST and the files in socketcand_corpus differ"
    );
    let results: BTreeSet<&str> = cases
        .iter()
        .flat_map(|c| c.expect.iter().map(String::as_str))
        .collect();
    for label in ProtocolError::LABELS {
        assert!(
            results
                .iter()
                .any(|r| *r == format!("err:{label}") || r.starts_with(&format!("err:{label}("))),
            "no corpus input for {label}"
        );
    }
    for name in UNSUPPORTED_COMMANDS {
        assert!(
            results.contains(format!("cmd:unsupported({name})").as_str()),
            "no corpus input for {name}"
        );
    }
}

/// python-can 4.6's `convert_ascii_message_to_can_message` for `< frame >`, step by step:
/// `msg[8:-2]`, `split(" ", 3)`, `int(parts[0], 16)`, `float(parts[1])`, `len(parts[0]) != 3`,
/// `bytearray.fromhex(parts[2])`. `None` where Python would raise or python-can gives up.
fn python_can_frame(msg: &str) -> Option<(u32, f64, bool, Vec<u8>)> {
    if !msg.ends_with(" >") || !msg.starts_with("< frame ") {
        return None;
    }
    let frame_string = msg.get(8..msg.len().saturating_sub(2)).unwrap_or("");
    let parts: Vec<&str> = frame_string.splitn(4, ' ').collect();
    let id = u32::from_str_radix(parts.first()?, 16).ok()?;
    let ts: f64 = parts.get(1)?.parse().ok()?;
    let is_ext = parts[0].len() != 3;
    let hex: Vec<char> = parts.get(2)?.chars().filter(|c| *c != ' ').collect();
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let data = hex
        .chunks(2)
        .map(|pair| u8::from_str_radix(&pair.iter().collect::<String>(), 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some((id, ts, is_ext, data))
}

/// Bytes a client might send: anything at all, bytes from the protocol's alphabet, or pieces of
/// commands run together, so that the interesting paths are reached often.
fn stream() -> impl Strategy<Value = Vec<u8>> {
    const ALPHABET: &[u8] = b"<<>> \t\r\n0123456789abcdefABCDEFsendopnrawmodeecho\0\x7f\x80\xff";
    const PIECES: &[&str] = &[
        "<", ">", " ", "\n", "< ", " >", "send", "open", "rawmode", "echo", "add", "can0", "B",
        "123", "1AAAAAAA", "800", "8", "0", "ff", "100", "x", "é", "\0",
    ];
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..8192),
        proptest::collection::vec(proptest::sample::select(ALPHABET), 0..8192),
        proptest::collection::vec(proptest::sample::select(PIECES), 0..1500)
            .prop_map(|pieces| pieces.concat().into_bytes()),
        (0..2 * MAX_COMMAND_LEN, any::<u8>()).prop_map(|(n, filler)| {
            let mut bytes = vec![b'<'];
            bytes.resize(n, filler);
            bytes.extend_from_slice(b">< echo >");
            bytes
        }),
    ]
}

fn classic_frame() -> impl Strategy<Value = Frame> {
    (
        any::<bool>(),
        any::<u32>(),
        proptest::collection::vec(any::<u8>(), 0..=8),
    )
        .prop_map(|(extended, raw, data)| {
            let id = if extended {
                (raw & CAN_EFF_MASK) | CAN_EFF_FLAG
            } else {
                raw & CAN_SFF_MASK
            };
            Frame::classic(id, &data).expect("valid classic frame")
        })
}

proptest! {
    #[test]
    fn any_stream_splits_the_same_in_any_pieces(
        bytes in stream(),
        cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..16),
    ) {
        let whole = split_whole(&bytes);
        for item in &whole {
            if let Ok(text) = item {
                prop_assert!(text.len() <= MAX_COMMAND_LEN, "{} bytes", text.len());
                prop_assert!(text.is_ascii());
                prop_assert!(text.starts_with('<') && text.ends_with('>'));
                prop_assert_eq!(text.matches(['<', '>']).count(), 2);
            }
            // Never panics, and a fatal error only ever comes from the splitter.
            if let Ok(text) = item {
                prop_assert!(parse(text).err().is_none_or(|e| !e.is_fatal()));
            }
        }
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        at.sort_unstable();
        at.dedup();
        let mut pieces = Vec::new();
        let mut from = 0;
        for to in at.into_iter().chain([bytes.len()]) {
            pieces.push(&bytes[from..to]);
            from = to;
        }
        prop_assert_eq!(&split_in_pieces(pieces), &whole);
        prop_assert_eq!(&split_bytewise(&bytes), &whole);
    }

    #[test]
    fn format_send_parses_back_to_the_frame(frame in classic_frame()) {
        let text = format_send(&frame).expect("a classic data frame has a send");
        prop_assert!(text.len() <= MAX_COMMAND_LEN);
        prop_assert_eq!(split_whole(text.as_bytes()), vec![Ok(text.clone())]);
        prop_assert_eq!(parse(&text), Ok(Command::Send(frame)));
    }

    #[test]
    fn python_can_reads_format_frame_back(
        frame in classic_frame(),
        secs in 0u64..=4_102_444_800,
        micros in 0u32..1_000_000,
    ) {
        let mut out = String::new();
        prop_assert!(format_frame(&frame, Duration::new(secs, micros * 1000), &mut out));
        let (id, ts, is_ext, data) = python_can_frame(&out).expect("python-can reads it");
        prop_assert_eq!(id, frame.id() & CAN_EFF_MASK);
        prop_assert_eq!(is_ext, frame.is_extended());
        prop_assert_eq!(data.as_slice(), frame.data());
        let tail = format!(" {secs}.{micros:06} {} >", hex_upper(frame.data()));
        prop_assert!(out.ends_with(&tail), "{} does not end in {}", out, tail);
        // An f64 holds 15-16 significant digits: whole microseconds up to 2100.
        prop_assert!((ts - (secs as f64 + f64::from(micros) / 1e6)).abs() < 1e-5);
    }
}

fn hex_upper(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02X}")).collect()
}
