//! The tunnel's wire format against a corpus of packets: golden packets made by cannelloni
//! itself, one input per way a packet can be wrong, and whatever proptest ever found. What each
//! decodes to is in `tests/tunnel_corpus/MANIFEST`.
//!
//! Runs on the host: `cargo test -p vcan-plugin --test tunnel_wire`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use vcan_plugin::tunnel::wire::{DEFAULT_PAYLOAD_LIMIT, Encoder, WireError, decode};

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tunnel_corpus")
}

fn read_input(name: &str) -> Vec<u8> {
    let path = corpus().join(name);
    let raw = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if name.ends_with(".bin") {
        return raw;
    }
    assert!(name.ends_with(".hex"), "{name}: inputs are .hex or .bin");
    let text = String::from_utf8(raw).unwrap_or_else(|e| panic!("{name}: {e}"));
    let digits: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(str::split_whitespace)
        .collect();
    assert!(
        digits.len().is_multiple_of(2),
        "{name}: odd number of hex digits"
    );
    (0..digits.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&digits[i..i + 2], 16)
                .unwrap_or_else(|e| panic!("{name}: {:?}: {e}", &digits[i..i + 2]))
        })
        .collect()
}

struct Case {
    file: String,
    expect: Expect,
}

enum Expect {
    Ok { seq: u8, frames: Vec<String> },
    Error(String),
}

fn manifest() -> Vec<Case> {
    let text = fs::read_to_string(corpus().join("MANIFEST")).expect("MANIFEST");
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|line| {
            let mut words = line.split_whitespace();
            let file = words.next().expect("file").to_string();
            let expect = match words.next() {
                Some("ok") => Expect::Ok {
                    seq: words
                        .next()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or_else(|| panic!("{file}: ok needs a sequence number")),
                    frames: words.map(str::to_string).collect(),
                },
                Some("error") => Expect::Error(
                    words
                        .next()
                        .unwrap_or_else(|| panic!("{file}: error needs a label"))
                        .to_string(),
                ),
                other => panic!("{file}: expected ok or error, found {other:?}"),
            };
            Case { file, expect }
        })
        .collect()
}

#[test]
fn corpus_decodes_as_the_manifest_says() {
    let cases = manifest();
    let mut failures = Vec::new();
    for case in &cases {
        let bytes = read_input(&case.file);
        let got = decode(&bytes);
        match (&case.expect, got) {
            (Expect::Ok { seq, frames }, Ok(packet)) => {
                let decoded: Vec<String> = packet.frames().map(|f| f.to_string()).collect();
                if packet.seq() != *seq || &decoded != frames {
                    failures.push(format!(
                        "{}: decoded seq {} frames {decoded:?}, expected seq {seq} frames {frames:?}",
                        case.file,
                        packet.seq()
                    ));
                    continue;
                }
                // Canonical packets, so the encoder must give back the very same bytes.
                let all: Vec<_> = packet.frames().collect();
                let mut out = Vec::new();
                let n = Encoder::new(DEFAULT_PAYLOAD_LIMIT).expect("limit").encode(
                    packet.seq(),
                    &all,
                    &mut out,
                );
                if n != all.len() || out != bytes {
                    failures.push(format!("{}: re-encodes to different bytes", case.file));
                }
            }
            (Expect::Ok { .. }, Err(e)) => {
                failures.push(format!("{}: expected a packet, got {e}", case.file));
            }
            (Expect::Error(label), Ok(packet)) => {
                failures.push(format!("{}: expected {label}, got {packet:?}", case.file));
            }
            (Expect::Error(label), Err(e)) => {
                if e.label() != label {
                    failures.push(format!(
                        "{}: expected {label}, got {} ({e})",
                        case.file,
                        e.label()
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn manifest_covers_the_corpus_and_every_error() {
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
        "MANIFEST and the files in tunnel_corpus differ"
    );
    let labels: BTreeSet<&str> = cases
        .iter()
        .filter_map(|c| match &c.expect {
            Expect::Error(label) => Some(label.as_str()),
            Expect::Ok { .. } => None,
        })
        .collect();
    for label in WireError::LABELS {
        assert!(labels.contains(label), "no corpus input for {label}");
    }
    for label in &labels {
        assert!(WireError::LABELS.contains(label), "unknown label {label}");
    }
}
