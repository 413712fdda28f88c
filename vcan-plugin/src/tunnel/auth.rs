//! Authentication of the packets the plugin's instances send each other.
//!
//! Source addresses prove nothing: any pod allowed raw sockets can send a UDP packet with a
//! plugin pod's address, and under hostNetwork no NetworkPolicy stands in the way. So every
//! packet between instances carries a trailer after the cannelloni packet:
//!
//! ```text
//! epoch (u64, BE) | counter (u64, BE) | tag (16 bytes)
//! ```
//!
//! `tag` is HMAC-SHA256 under the cluster's shared key over a domain string, the bus's name and
//! everything before the tag, truncated to 128 bits. `epoch` is the sender's start time in
//! nanoseconds, `counter` counts its packets from 0: together they let a receiver drop a packet
//! it has accepted before ([`ReplayWindow`]), be it a duplicate made by the network or a replay
//! by someone who captured it, and tell a peer that restarted (a newer epoch) from one replaying
//! an older run (an older epoch). Packets to and from external peers (cannelloni) carry no
//! trailer: they cannot authenticate, and are accepted from their configured addresses only.

use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes the trailer adds to a packet.
pub const TRAILER_LEN: usize = 8 + 8 + TAG_LEN;
const TAG_LEN: usize = 16;
/// Shortest key accepted, in bytes: 128 bits.
pub const MIN_KEY_LEN: usize = 16;
/// Separates this use of the key from any other.
const DOMAIN: &[u8] = b"vcan-plugin tunnel v1\0";

/// The key shared by every instance, as read from its file.
#[derive(Clone)]
pub struct TunnelKey {
    key: Vec<u8>,
}

impl std::fmt::Debug for TunnelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TunnelKey(..)")
    }
}

/// Why the key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error(
        "cannot read the tunnel key file {path}: {source} (mount the Secret holding the key and \
         point --tunnel-key-file at it)"
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The key is too short to be a key.
    #[error(
        "the tunnel key in {path} has {len} bytes, fewer than {MIN_KEY_LEN}: generate one with \
         `head -c 32 /dev/urandom | base64`"
    )]
    TooShort {
        /// The file.
        path: PathBuf,
        /// Its length, surrounding whitespace left out.
        len: usize,
    },
}

impl TunnelKey {
    /// The key in `path`: its bytes, surrounding whitespace left out (a Secret made with
    /// `--from-literal` or from a file with a final newline holds the same key).
    pub fn load(path: &Path) -> Result<TunnelKey, KeyError> {
        let raw = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let key = raw.trim_ascii();
        if key.len() < MIN_KEY_LEN {
            return Err(KeyError::TooShort {
                path: path.to_path_buf(),
                len: key.len(),
            });
        }
        Ok(TunnelKey { key: key.to_vec() })
    }

    /// A key from its bytes.
    #[cfg(test)]
    fn from_bytes(key: &[u8]) -> TunnelKey {
        TunnelKey { key: key.to_vec() }
    }

    /// The MAC over the domain, bus `bus` and `covered`, ready to finish or verify.
    fn mac(&self, bus: &str, covered: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(DOMAIN);
        mac.update(bus.as_bytes());
        mac.update(&[0]);
        mac.update(covered);
        mac
    }

    fn tag(&self, bus: &str, covered: &[u8]) -> [u8; TAG_LEN] {
        let full = self.mac(bus, covered).finalize().into_bytes();
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&full[..TAG_LEN]);
        tag
    }

    /// Appends the trailer for packet number `counter` of run `epoch` to `packet`.
    pub fn seal(&self, bus: &str, epoch: u64, counter: u64, packet: &mut Vec<u8>) {
        packet.extend_from_slice(&epoch.to_be_bytes());
        packet.extend_from_slice(&counter.to_be_bytes());
        let tag = self.tag(bus, packet);
        packet.extend_from_slice(&tag);
    }

    /// Checks the trailer of `bytes`: returns the cannelloni packet before it and the sender's
    /// epoch and counter, or `None` when the packet is too short or its tag is wrong.
    pub fn open<'a>(&self, bus: &str, bytes: &'a [u8]) -> Option<(&'a [u8], Sealed)> {
        let covered_len = bytes.len().checked_sub(TAG_LEN)?;
        let inner_len = covered_len.checked_sub(16)?;
        let (covered, tag) = bytes.split_at(covered_len);
        // Constant time: a tag must not be guessable byte by byte from timing.
        self.mac(bus, covered).verify_truncated_left(tag).ok()?;
        let word = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(b)
        };
        Some((
            &bytes[..inner_len],
            Sealed {
                epoch: word(inner_len),
                counter: word(inner_len + 8),
            },
        ))
    }
}

/// Where an authenticated packet sits in its sender's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    /// The sender's run.
    pub epoch: u64,
    /// The packet's number in that run.
    pub counter: u64,
}

/// What [`ReplayWindow::check`] made of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Not seen before: deliver it.
    Fresh,
    /// The first packet of a newer run of the sender (it restarted): deliver it, and forget
    /// where the old run's numbering was.
    NewEpoch,
    /// Accepted before (a duplicate or a replay), or from an older run: drop it.
    Replayed,
}

/// Packets accepted from one sender: the newest counter of its newest run and which of the
/// [`ReplayWindow::WIDTH`] counters before it arrived, as IPsec and WireGuard keep them.
#[derive(Debug, Clone, Default)]
pub struct ReplayWindow {
    epoch: Option<u64>,
    newest: u64,
    /// Bit `i`: counter `newest - i` was accepted.
    seen: u128,
}

impl ReplayWindow {
    /// How far behind the newest counter a packet may still arrive (reordered by the network).
    pub const WIDTH: u64 = 128;

    /// Checks `sealed` and, unless it is [`Freshness::Replayed`], records it.
    pub fn check(&mut self, sealed: Sealed) -> Freshness {
        match self.epoch {
            Some(epoch) if sealed.epoch < epoch => Freshness::Replayed,
            Some(epoch) if sealed.epoch == epoch => {
                if sealed.counter > self.newest {
                    let shift = sealed.counter - self.newest;
                    self.seen = if shift >= Self::WIDTH {
                        0
                    } else {
                        self.seen << shift
                    };
                    self.seen |= 1;
                    self.newest = sealed.counter;
                    Freshness::Fresh
                } else {
                    let behind = self.newest - sealed.counter;
                    if behind >= Self::WIDTH || self.seen & (1 << behind) != 0 {
                        return Freshness::Replayed;
                    }
                    self.seen |= 1 << behind;
                    Freshness::Fresh
                }
            }
            previous => {
                self.epoch = Some(sealed.epoch);
                self.newest = sealed.counter;
                self.seen = 1;
                if previous.is_some() {
                    Freshness::NewEpoch
                } else {
                    Freshness::Fresh
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> TunnelKey {
        TunnelKey::from_bytes(b"0123456789abcdef0123456789abcdef")
    }

    #[test]
    fn a_sealed_packet_opens_with_the_same_key_and_bus_only() {
        let mut packet = vec![2, 0, 7, 0, 0];
        key().seal("x", 42, 9, &mut packet);
        assert_eq!(packet.len(), 5 + TRAILER_LEN);
        let (inner, sealed) = key().open("x", &packet).expect("opens");
        assert_eq!(inner, [2, 0, 7, 0, 0]);
        assert_eq!(
            sealed,
            Sealed {
                epoch: 42,
                counter: 9
            }
        );
        assert!(key().open("y", &packet).is_none(), "another bus's packet");
        let other = TunnelKey::from_bytes(b"another key of 32 bytes, really!");
        assert!(other.open("x", &packet).is_none(), "another key");
        for i in 0..packet.len() {
            let mut flipped = packet.clone();
            flipped[i] ^= 0x01;
            assert!(key().open("x", &flipped).is_none(), "byte {i} changed");
        }
        assert!(key().open("x", &packet[..TRAILER_LEN - 1]).is_none());
        assert!(key().open("x", &[]).is_none());
    }

    #[test]
    fn keys_are_read_trimmed_and_short_ones_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key");
        std::fs::write(&path, "  c2VjcmV0IGtleSBvZiB0aGUgY2x1c3Rlcg==\n").expect("write");
        let key = TunnelKey::load(&path).expect("a key");
        assert_eq!(key.key, b"c2VjcmV0IGtleSBvZiB0aGUgY2x1c3Rlcg==");
        std::fs::write(&path, "short\n").expect("write");
        let error = TunnelKey::load(&path).expect_err("too short").to_string();
        assert!(error.contains("has 5 bytes, fewer than 16"), "{error}");
        let error = TunnelKey::load(&dir.path().join("none"))
            .expect_err("missing")
            .to_string();
        assert!(error.contains("--tunnel-key-file"), "{error}");
    }

    fn at(epoch: u64, counter: u64) -> Sealed {
        Sealed { epoch, counter }
    }

    #[test]
    fn duplicates_and_replays_are_refused_reordering_is_not() {
        let mut w = ReplayWindow::default();
        assert_eq!(w.check(at(5, 0)), Freshness::Fresh);
        assert_eq!(w.check(at(5, 0)), Freshness::Replayed, "duplicate");
        assert_eq!(w.check(at(5, 3)), Freshness::Fresh);
        assert_eq!(w.check(at(5, 1)), Freshness::Fresh, "reordered");
        assert_eq!(w.check(at(5, 1)), Freshness::Replayed);
        assert_eq!(w.check(at(5, 2)), Freshness::Fresh);
        assert_eq!(w.check(at(5, 3)), Freshness::Replayed);
        assert_eq!(w.check(at(5, 1000)), Freshness::Fresh);
        assert_eq!(
            w.check(at(5, 1000 - ReplayWindow::WIDTH)),
            Freshness::Replayed,
            "too old to tell"
        );
        assert_eq!(
            w.check(at(5, 1000 - ReplayWindow::WIDTH + 1)),
            Freshness::Fresh
        );
    }

    #[test]
    fn a_newer_run_resets_an_older_one_is_a_replay() {
        let mut w = ReplayWindow::default();
        assert_eq!(w.check(at(5, 70)), Freshness::Fresh);
        assert_eq!(w.check(at(9, 0)), Freshness::NewEpoch);
        assert_eq!(w.check(at(9, 1)), Freshness::Fresh);
        assert_eq!(
            w.check(at(5, 71)),
            Freshness::Replayed,
            "the old run, replayed"
        );
        assert_eq!(w.check(at(9, 0)), Freshness::Replayed);
    }
}
