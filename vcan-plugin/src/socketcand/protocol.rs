//! socketcand's ASCII protocol (linux-can/socketcand `doc/protocol.md`), as far as a server that
//! serves one bus in raw mode needs it.
//!
//! A client talks in commands enclosed in `<` and `>`, e.g. `< open can0 >`, `< rawmode >`,
//! `< send 123 2 11 22 >`; the server greets with [`HELLO`], acknowledges with [`OK`], sends what
//! it receives in raw mode as `< frame ID SECONDS.MICROSECONDS DATA >` ([`format_frame`]) and
//! complains with `< error MESSAGE >` ([`format_error`]).
//!
//! [`Splitter`] cuts a client's byte stream into commands and [`parse`] reads one. Both are
//! stricter than socketcand, which `sscanf`s whatever sits between the first `<` and `>` in a
//! fixed buffer: every input is either a command or one [`ProtocolError`], each kind of error has
//! its own [`ProtocolError::label`] for metrics, and memory stays bounded whatever a client sends.
//! Everything python-can 4.6 (the client this is written against) and socketcand's documentation
//! write is accepted.
//!
//! What the server sends is written exactly as socketcand's raw mode writes it, down to the
//! spacing, because python-can slices the text by position rather than parsing it.

use std::fmt::Write as _;
use std::time::Duration;

use crate::kernel::frame::{CAN_EFF_FLAG, CAN_EFF_MASK, CAN_MAX_DLEN, CAN_SFF_MASK};
use crate::tunnel::wire::Frame;

/// Longest command accepted, `<` to `>` inclusive. The longest valid command, a send of 8 bytes
/// with an extended id, is about 45 characters and open takes names of at most 16 like
/// socketcand's, so this leaves room for generous spacing while a client cannot make the server
/// hold more than this per connection.
pub const MAX_COMMAND_LEN: usize = 256;

/// Longest bus name `< open NAME >` takes; socketcand's documented limit.
pub const MAX_BUS_NAME_LEN: usize = 16;

/// The greeting a server sends as soon as a client connects; python-can waits for exactly this
/// text before it opens a bus.
pub const HELLO: &str = "< hi >";

/// The reply to a command that succeeded (open and the mode switches).
pub const OK: &str = "< ok >";

/// The reply to `< echo >`, which is the command itself: clients use it to see the connection is
/// up and to measure latency.
pub const ECHO: &str = "< echo >";

/// Every name [`Command::Unsupported`] carries, so that a server's metrics and tests can list
/// them. `bittiming` and `ctrlmode` stand for socketcand's bus configuration commands
/// `< BUS B ... >` and `< BUS C ... >`, which have no command word of their own; `ctrlmode` is
/// iproute2's name for the same settings (listen-only, loopback, triple sampling).
pub const UNSUPPORTED_COMMANDS: [&str; 14] = [
    "add",
    "update",
    "delete",
    "filter",
    "muxfilter",
    "subscribe",
    "unsubscribe",
    "statistics",
    "isotpconf",
    "sendpdu",
    "sendrtr",
    "fdsend",
    "bittiming",
    "ctrlmode",
];

/// Longest excerpt of client text quoted in an error, so that an error reply stays short.
const MAX_QUOTE_LEN: usize = 32;

/// Input bytes a [`Splitter`] keeps room for after its input is used up; a single huge push
/// should not pin its size for the rest of the connection.
const RETAINED_INPUT_CAPACITY: usize = 16 * 1024;

/// One command a client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `< open NAME >`: select the bus by name; the server has one, and decides what to do with
    /// a name that is not its own.
    Open(String),
    /// `< rawmode >`: receive every frame on the bus and send frames with `< send >`.
    RawMode,
    /// `< bcmmode >`: socketcand's default mode after open, run by the kernel's broadcast
    /// manager.
    BcmMode,
    /// `< controlmode >`: the mode for statistics.
    ControlMode,
    /// `< isotpmode >`: the mode for ISO-TP transfers.
    IsotpMode,
    /// `< echo >`: answered with [`ECHO`].
    Echo,
    /// `< send ID DLC [BYTE]* >`: put one classic data frame on the bus.
    Send(Frame),
    /// A socketcand command this endpoint does not carry out, by name (one of
    /// [`UNSUPPORTED_COMMANDS`]), so that the client hears it is known but not served here
    /// rather than that it is wrong. Its arguments are not looked at.
    Unsupported(&'static str),
}

/// Why bytes from a client are no command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A command ran past [`MAX_COMMAND_LEN`] without its `>`.
    #[error("command longer than {limit} bytes")]
    TooLong {
        /// The limit, [`MAX_COMMAND_LEN`], so that the message tells the client what to keep to.
        limit: usize,
    },
    /// A command with bytes that are not ASCII; the protocol is ASCII only.
    #[error("command with bytes that are not ASCII")]
    NotAscii,
    /// Bytes outside any command (other than whitespace), or a command cut short by the start of
    /// another.
    #[error("bytes outside a command: commands are enclosed in angle brackets")]
    Unframed,
    /// A command with no word in it.
    #[error("empty command")]
    Empty,
    /// A command word neither socketcand nor this endpoint knows. The word is quoted with
    /// anything but printable ASCII replaced and cut to 32 characters, so that it is safe to
    /// log and to send back.
    #[error("unknown command '{0}'")]
    Unknown(String),
    /// A known command with arguments it cannot take.
    #[error("{command}: {reason}")]
    BadArguments {
        /// The command word.
        command: &'static str,
        /// What is wrong, for the client to read.
        reason: String,
    },
}

impl ProtocolError {
    /// Every [`ProtocolError::label`], so that a metrics layer can create its series up front
    /// and tests can check each is covered.
    pub const LABELS: [&'static str; 6] = [
        "too_long",
        "not_ascii",
        "unframed",
        "empty",
        "unknown_command",
        "bad_arguments",
    ];

    /// A short, fixed name for the kind of error, fit for a metric label.
    pub fn label(&self) -> &'static str {
        match self {
            ProtocolError::TooLong { .. } => "too_long",
            ProtocolError::NotAscii => "not_ascii",
            ProtocolError::Unframed => "unframed",
            ProtocolError::Empty => "empty",
            ProtocolError::Unknown(_) => "unknown_command",
            ProtocolError::BadArguments { .. } => "bad_arguments",
        }
    }

    /// Whether the connection cannot go on after this error. Only a command that is too long is:
    /// what follows it can no longer be told apart from the rest of it, so anything read as a
    /// command after it might be part of a frame the client meant differently.
    pub fn is_fatal(&self) -> bool {
        matches!(self, ProtocolError::TooLong { .. })
    }
}

/// Whitespace allowed between commands and between the words of a command.
fn is_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\r' | b'\n')
}

/// Where a [`Splitter`] is in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    /// Between commands: whitespace is skipped, `<` starts a command.
    #[default]
    Between,
    /// In a run of bytes outside any command, already reported; skipped up to the next `<`.
    Unframed,
    /// In a command whose bytes so far are in `pending`.
    Command {
        /// A byte of the command is not ASCII; reported once the command ends.
        not_ascii: bool,
    },
    /// In a command that grew too long, already reported; skipped up to its `>` (or the next
    /// `<`), so that its tail is not taken for garbage or a command.
    TooLong,
}

/// Splits a client's byte stream into commands.
///
/// The contract: the caller [`push`](Splitter::push)es whatever it read, of any size, and then
/// calls [`next`](Iterator::next) until it returns `None` before pushing again. A splitter then
/// holds at most the last push plus one pending command, which is never more than
/// [`MAX_COMMAND_LEN`] bytes: a longer one is reported as [`ProtocolError::TooLong`] as soon as
/// it cannot end in time, and dropped.
///
/// As an iterator it is not fused: `None` means "more bytes needed", and later pushes bring more
/// items. The results do not depend on how the stream was cut into pushes.
///
/// Rules, in stream order:
/// - whitespace (space, tab, CR, LF) between commands is skipped;
/// - a command runs from `<` to the next `>` and is returned with both;
/// - any other run of bytes outside a command is one [`ProtocolError::Unframed`], and everything
///   up to the next `<` is skipped with it;
/// - a `<` inside a command starts the command anew there, the cut-off part being one
///   [`ProtocolError::Unframed`];
/// - a command with bytes that are not ASCII is one [`ProtocolError::NotAscii`] when it ends;
/// - a command that cannot end within [`MAX_COMMAND_LEN`] bytes is one
///   [`ProtocolError::TooLong`], and the rest of it, up to its `>` or the next `<`, is skipped.
#[derive(Debug, Default)]
pub struct Splitter {
    /// Pushed bytes not yet looked at start at `pos`.
    input: Vec<u8>,
    pos: usize,
    state: State,
    /// The command being read, from its `<`; never more than `MAX_COMMAND_LEN - 1` bytes, as a
    /// command is complete (or too long) by the time it would need more.
    pending: Vec<u8>,
}

impl Splitter {
    /// A splitter at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes read from the client; they are looked at by the following calls to
    /// [`next`](Iterator::next).
    pub fn push(&mut self, bytes: &[u8]) {
        // Compact first, so that a caller who pushes without draining still does not keep bytes
        // already split off.
        if self.pos > 0 {
            self.input.drain(..self.pos);
            self.pos = 0;
        }
        self.input.extend_from_slice(bytes);
    }

    /// Starts a command at a `<`.
    fn open(&mut self) {
        self.pending.clear();
        self.pending.push(b'<');
        self.state = State::Command { not_ascii: false };
    }

    /// Takes one byte; returns what it completes, if anything.
    fn step(&mut self, byte: u8) -> Option<Result<String, ProtocolError>> {
        match self.state {
            State::Between => {
                if byte == b'<' {
                    self.open();
                    None
                } else if is_space(byte) {
                    None
                } else {
                    self.state = State::Unframed;
                    Some(Err(ProtocolError::Unframed))
                }
            }
            State::Unframed => {
                if byte == b'<' {
                    self.open();
                }
                None
            }
            State::TooLong => {
                if byte == b'<' {
                    self.open();
                } else if byte == b'>' {
                    self.state = State::Between;
                }
                None
            }
            State::Command { not_ascii } => match byte {
                b'>' => {
                    self.state = State::Between;
                    if not_ascii {
                        self.pending.clear();
                        return Some(Err(ProtocolError::NotAscii));
                    }
                    self.pending.push(b'>');
                    // Every byte is ASCII, so each is its own char.
                    let text = self.pending.iter().map(|&b| char::from(b)).collect();
                    self.pending.clear();
                    Some(Ok(text))
                }
                b'<' => {
                    self.open();
                    Some(Err(ProtocolError::Unframed))
                }
                // This byte and the '>' still to come would take the command past the limit.
                _ if self.pending.len() + 2 > MAX_COMMAND_LEN => {
                    self.pending.clear();
                    self.state = State::TooLong;
                    Some(Err(ProtocolError::TooLong {
                        limit: MAX_COMMAND_LEN,
                    }))
                }
                _ => {
                    self.pending.push(byte);
                    if !byte.is_ascii() {
                        self.state = State::Command { not_ascii: true };
                    }
                    None
                }
            },
        }
    }
}

impl Iterator for Splitter {
    type Item = Result<String, ProtocolError>;

    /// The next complete command's text (`<` to `>` inclusive), an error for bytes that cannot
    /// be part of a command, or `None` when more bytes are needed.
    fn next(&mut self) -> Option<Self::Item> {
        while let Some(&byte) = self.input.get(self.pos) {
            self.pos += 1;
            if let Some(result) = self.step(byte) {
                return Some(result);
            }
        }
        self.input.clear();
        self.pos = 0;
        if self.input.capacity() > RETAINED_INPUT_CAPACITY {
            self.input.shrink_to(RETAINED_INPUT_CAPACITY);
        }
        None
    }
}

/// `text` fit to quote in an error: printable ASCII only, at most [`MAX_QUOTE_LEN`] characters.
fn quote(text: &str) -> String {
    text.chars()
        .take(MAX_QUOTE_LEN)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

/// Parses one command as [`Splitter`] returns it: `<`, words separated by whitespace, `>`.
/// Spaces next to the brackets are optional (`<echo>` is `< echo >`); command words are
/// case-sensitive, as socketcand's.
pub fn parse(command: &str) -> Result<Command, ProtocolError> {
    if command.len() > MAX_COMMAND_LEN {
        return Err(ProtocolError::TooLong {
            limit: MAX_COMMAND_LEN,
        });
    }
    if !command.is_ascii() {
        return Err(ProtocolError::NotAscii);
    }
    let inner = command
        .strip_prefix('<')
        .and_then(|rest| rest.strip_suffix('>'))
        .ok_or(ProtocolError::Unframed)?;
    // A Splitter never returns these; text from elsewhere gets the answer the Splitter would
    // have given.
    if inner.contains(['<', '>']) {
        return Err(ProtocolError::Unframed);
    }
    let mut words = inner
        .split(|c: char| u8::try_from(c).is_ok_and(is_space))
        .filter(|w| !w.is_empty());
    let Some(word) = words.next() else {
        return Err(ProtocolError::Empty);
    };
    // At most MAX_COMMAND_LEN / 2 words fit, so collecting them is bounded.
    let args: Vec<&str> = words.collect();
    match word {
        "open" => parse_open(&args),
        "rawmode" => no_arguments("rawmode", &args, Command::RawMode),
        "bcmmode" => no_arguments("bcmmode", &args, Command::BcmMode),
        "controlmode" => no_arguments("controlmode", &args, Command::ControlMode),
        "isotpmode" => no_arguments("isotpmode", &args, Command::IsotpMode),
        "echo" => no_arguments("echo", &args, Command::Echo),
        "send" => parse_send(&args).map(Command::Send),
        _ => {
            if let Some(name) = UNSUPPORTED_COMMANDS.iter().find(|name| **name == word) {
                return Ok(Command::Unsupported(name));
            }
            // socketcand's bus configuration, `< BUS B ... >` and `< BUS C ... >`, names the bus
            // where other commands have their word.
            match args.first() {
                Some(&"B") => Ok(Command::Unsupported("bittiming")),
                Some(&"C") => Ok(Command::Unsupported("ctrlmode")),
                _ => Err(ProtocolError::Unknown(quote(word))),
            }
        }
    }
}

fn bad(command: &'static str, reason: String) -> ProtocolError {
    ProtocolError::BadArguments { command, reason }
}

fn no_arguments(
    name: &'static str,
    args: &[&str],
    command: Command,
) -> Result<Command, ProtocolError> {
    if args.is_empty() {
        Ok(command)
    } else {
        Err(bad(
            name,
            format!(
                "takes no arguments, got {} ('{}')",
                args.len(),
                quote(args[0])
            ),
        ))
    }
}

fn parse_open(args: &[&str]) -> Result<Command, ProtocolError> {
    let [name] = args else {
        return Err(bad(
            "open",
            format!("takes one bus name, got {} arguments", args.len()),
        ));
    };
    // Interface names are this; anything else could not name a bus and might not be safe to
    // log or echo.
    let valid = (1..=MAX_BUS_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(Command::Open((*name).to_string()))
    } else {
        Err(bad(
            "open",
            format!(
                "bus name '{}': 1 to {MAX_BUS_NAME_LEN} of A-Z a-z 0-9 . _ -",
                quote(name)
            ),
        ))
    }
}

/// `word` as a number if it is 1 to `max_digits` hex digits and nothing else (`from_str_radix`
/// alone would take a sign).
fn hex(word: &str, max_digits: usize) -> Option<u32> {
    if word.is_empty() || word.len() > max_digits || !word.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(word, 16).ok()
}

fn parse_send(args: &[&str]) -> Result<Frame, ProtocolError> {
    let [id, dlc, data @ ..] = args else {
        return Err(bad(
            "send",
            "expected an id, a length and the data bytes".to_string(),
        ));
    };
    let id = parse_id(id)?;
    let len = hex(dlc, 1)
        .and_then(|len| usize::try_from(len).ok())
        .filter(|len| *len <= CAN_MAX_DLEN)
        .ok_or_else(|| {
            bad(
                "send",
                format!(
                    "length '{}': one digit 0 to 8 (CAN FD is not carried)",
                    quote(dlc)
                ),
            )
        })?;
    if data.len() != len {
        return Err(bad(
            "send",
            format!("length {len} but {} data bytes", data.len()),
        ));
    }
    let mut bytes = [0u8; CAN_MAX_DLEN];
    for (slot, word) in bytes.iter_mut().zip(data) {
        *slot = hex(word, 2)
            .and_then(|b| u8::try_from(b).ok())
            .ok_or_else(|| {
                bad(
                    "send",
                    format!("data byte '{}': one or two hex digits", quote(word)),
                )
            })?;
    }
    Frame::classic(id, &bytes[..len]).map_err(|e| bad("send", e.to_string()))
}

/// A send's id as `canid_t`. As in socketcand, the number of digits decides the kind: exactly 8
/// is an extended id, fewer a standard one, whatever the value.
fn parse_id(word: &str) -> Result<u32, ProtocolError> {
    let Some(value) = hex(word, 8) else {
        return Err(bad(
            "send",
            format!(
                "id '{}': 1 to 3 hex digits, or 8 for an extended id",
                quote(word)
            ),
        ));
    };
    if word.len() == 8 {
        if value > CAN_EFF_MASK {
            return Err(bad(
                "send",
                format!("extended id {value:08X} above {CAN_EFF_MASK:08X}"),
            ));
        }
        Ok(value | CAN_EFF_FLAG)
    } else if value > CAN_SFF_MASK {
        Err(bad(
            "send",
            format!(
                "standard id {value:X} above {CAN_SFF_MASK:03X}; write an extended id with 8 hex digits"
            ),
        ))
    } else {
        Ok(value)
    }
}

/// Appends `frame` as socketcand's raw mode sends it to clients, received at `at` (since the
/// Unix epoch):
/// `< frame ID SECONDS.MICROSECONDS DATA >`, the id in 3 hex digits (8 for an extended id),
/// the data as two hex digits a byte with no spaces; an error frame as
/// `< error CLASS SECONDS.MICROSECONDS >` with its error class bits.
///
/// Returns false, appending nothing, for a frame the protocol cannot carry: CAN FD frames and
/// remote frames, for which socketcand's raw mode has no syntax python-can reads.
///
/// An empty frame keeps both spaces around its (empty) data, `< frame 123 23.424242  >`:
/// python-can slices the text between `< frame ` and ` >` and needs a third part to read as
/// data.
pub fn format_frame(frame: &Frame, at: Duration, out: &mut String) -> bool {
    let (secs, micros) = (at.as_secs(), at.subsec_micros());
    // Writing to a String cannot fail; the results are ignored below for that reason.
    if frame.is_error() {
        let _ = write!(
            out,
            "< error {:03X} {secs}.{micros:06} >",
            frame.id() & CAN_EFF_MASK
        );
        return true;
    }
    if frame.is_fd() || frame.is_remote() {
        return false;
    }
    if frame.is_extended() {
        let _ = write!(
            out,
            "< frame {:08X} {secs}.{micros:06} ",
            frame.id() & CAN_EFF_MASK
        );
    } else {
        let _ = write!(
            out,
            "< frame {:03X} {secs}.{micros:06} ",
            frame.id() & CAN_SFF_MASK
        );
    }
    for byte in frame.data() {
        let _ = write!(out, "{byte:02X}");
    }
    out.push_str(" >");
    true
}

/// `< error MESSAGE >` for a reply to a client. `<` and `>` in the message become `(` and `)`
/// so that the reply stays one command, and anything but printable ASCII becomes `?`, as
/// python-can decodes what it receives as ASCII and fails on anything else.
pub fn format_error(message: &str) -> String {
    let mut out = String::from("< error ");
    out.extend(message.chars().map(|c| match c {
        '<' => '(',
        '>' => ')',
        c if c.is_ascii_graphic() || c == ' ' => c,
        _ => '?',
    }));
    out.push_str(" >");
    out
}

/// The `< send >` command python-can writes for a classic data frame: the id in 3 hex digits (8
/// for an extended id), the length as one hex digit, then each byte in lowercase hex without
/// padding, `< send 123 3 1 2 ff >`. `None` for frames a send cannot carry: CAN FD, remote and
/// error frames.
///
/// For an empty frame this writes `< send 123 0 >`; python-can writes `< send 123 0  >` with two
/// spaces, which parses the same.
pub fn format_send(frame: &Frame) -> Option<String> {
    if frame.is_fd() || frame.is_remote() || frame.is_error() {
        return None;
    }
    let mut out = String::from("< send ");
    // Writing to a String cannot fail.
    if frame.is_extended() {
        let _ = write!(out, "{:08X}", frame.id() & CAN_EFF_MASK);
    } else {
        let _ = write!(out, "{:03X}", frame.id() & CAN_SFF_MASK);
    }
    let _ = write!(out, " {:X}", frame.len());
    for byte in frame.data() {
        let _ = write!(out, " {byte:x}");
    }
    out.push_str(" >");
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::frame::CAN_ERR_FLAG;

    fn split_all(bytes: &[u8]) -> Vec<Result<String, ProtocolError>> {
        let mut splitter = Splitter::new();
        splitter.push(bytes);
        splitter.by_ref().collect()
    }

    fn ok(text: &str) -> Result<String, ProtocolError> {
        Ok(text.to_string())
    }

    fn frame(id: u32, data: &[u8]) -> Frame {
        Frame::classic(id, data).expect("classic frame")
    }

    fn reason(result: Result<Command, ProtocolError>) -> String {
        match result {
            Err(ProtocolError::BadArguments { reason, .. }) => reason,
            other => panic!("expected bad arguments, got {other:?}"),
        }
    }

    /// python-can 4.6's `convert_ascii_message_to_can_message` for `< frame >`, line by line:
    /// `msg[8:-2]`, `split(" ", 3)`, `int(parts[0], 16)`, `float(parts[1])`,
    /// `len(parts[0]) != 3`, `bytearray.fromhex(parts[2])`. `None` where Python would raise or
    /// python-can returns None.
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

    #[test]
    fn splits_commands_and_skips_whitespace_between() {
        assert_eq!(
            split_all(b" \r\n\t< open can0 >\n<rawmode>  < send 123 0 >"),
            vec![ok("< open can0 >"), ok("<rawmode>"), ok("< send 123 0 >")]
        );
    }

    #[test]
    fn waits_for_the_closing_bracket_across_pushes() {
        let mut splitter = Splitter::new();
        splitter.push(b"< ech");
        assert_eq!(splitter.next(), None);
        splitter.push(b"o >< op");
        assert_eq!(splitter.next(), Some(ok("< echo >")));
        assert_eq!(splitter.next(), None);
        splitter.push(b"en x >");
        assert_eq!(splitter.next(), Some(ok("< open x >")));
        assert_eq!(splitter.next(), None);
    }

    #[test]
    fn a_run_of_garbage_is_one_error() {
        assert_eq!(
            split_all(b"hello world\n> \0 <echo> junk"),
            vec![
                Err(ProtocolError::Unframed),
                ok("<echo>"),
                Err(ProtocolError::Unframed)
            ]
        );
    }

    #[test]
    fn a_nested_open_bracket_restarts_the_command() {
        assert_eq!(
            split_all(b"< send 12< echo >"),
            vec![Err(ProtocolError::Unframed), ok("< echo >")]
        );
    }

    #[test]
    fn non_ascii_commands_are_consumed_whole() {
        assert_eq!(
            split_all("< open caé >< echo >".as_bytes()),
            vec![Err(ProtocolError::NotAscii), ok("< echo >")]
        );
        assert_eq!(
            split_all(b"< \xff\xfe >"),
            vec![Err(ProtocolError::NotAscii)]
        );
    }

    #[test]
    fn the_longest_command_is_accepted_and_one_more_byte_is_too_long() {
        let longest = format!("<{}>", "a".repeat(MAX_COMMAND_LEN - 2));
        assert_eq!(split_all(longest.as_bytes()), vec![ok(&longest)]);
        let too_long = format!("<{}>< echo >", "a".repeat(MAX_COMMAND_LEN - 1));
        assert_eq!(
            split_all(too_long.as_bytes()),
            vec![
                Err(ProtocolError::TooLong {
                    limit: MAX_COMMAND_LEN
                }),
                ok("< echo >")
            ]
        );
    }

    #[test]
    fn too_long_is_reported_before_the_command_ends_and_its_tail_skipped() {
        let mut splitter = Splitter::new();
        splitter.push(b"<");
        splitter.push(&[b'x'; MAX_COMMAND_LEN]);
        let err = splitter.next().expect("an error").expect_err("too long");
        assert!(err.is_fatal());
        assert_eq!(splitter.next(), None);
        assert!(splitter.pending.is_empty());
        splitter.push(b"xxx garbage > < echo >");
        assert_eq!(splitter.next(), Some(ok("< echo >")));
    }

    #[test]
    fn memory_stays_bounded_with_huge_pushes() {
        let mut splitter = Splitter::new();
        for _ in 0..16 {
            splitter.push(&[b'<'; 64 * 1024]);
            for result in splitter.by_ref() {
                assert_eq!(result, Err(ProtocolError::Unframed));
            }
            assert!(splitter.pending.len() < MAX_COMMAND_LEN);
            assert!(splitter.input.capacity() <= RETAINED_INPUT_CAPACITY);
        }
        splitter.push(&[b'a'; 64 * 1024]);
        assert_eq!(splitter.by_ref().count(), 1);
    }

    #[test]
    fn push_without_draining_keeps_only_unread_bytes() {
        let mut splitter = Splitter::new();
        splitter.push(b"< echo >< echo >");
        assert_eq!(splitter.next(), Some(ok("< echo >")));
        splitter.push(b"< rawmode >");
        assert_eq!(splitter.input, b"< echo >< rawmode >");
        assert_eq!(
            splitter.collect::<Vec<_>>(),
            vec![ok("< echo >"), ok("< rawmode >")]
        );
    }

    #[test]
    fn parses_modes_and_echo_with_or_without_spaces() {
        assert_eq!(parse("< rawmode >"), Ok(Command::RawMode));
        assert_eq!(parse("<rawmode>"), Ok(Command::RawMode));
        assert_eq!(parse("<\trawmode\r\n>"), Ok(Command::RawMode));
        assert_eq!(parse("< bcmmode >"), Ok(Command::BcmMode));
        assert_eq!(parse("< controlmode >"), Ok(Command::ControlMode));
        assert_eq!(parse("< isotpmode >"), Ok(Command::IsotpMode));
        assert_eq!(parse(ECHO), Ok(Command::Echo));
        assert_eq!(parse("<echo>"), Ok(Command::Echo));
        assert_eq!(
            reason(parse("< echo now >")),
            "takes no arguments, got 1 ('now')"
        );
        assert_eq!(
            parse("< rawmode 1 >").map_err(|e| e.label()),
            Err("bad_arguments")
        );
    }

    #[test]
    fn command_words_are_case_sensitive() {
        assert_eq!(
            parse("< ECHO >"),
            Err(ProtocolError::Unknown("ECHO".to_string()))
        );
    }

    #[test]
    fn parses_open() {
        assert_eq!(
            parse("< open can0 >"),
            Ok(Command::Open("can0".to_string()))
        );
        assert_eq!(
            parse("<open vcan-bus_1.x>"),
            Ok(Command::Open("vcan-bus_1.x".to_string()))
        );
        let sixteen = "a".repeat(MAX_BUS_NAME_LEN);
        assert_eq!(
            parse(&format!("< open {sixteen} >")),
            Ok(Command::Open(sixteen.clone()))
        );
        for bad in [
            "< open >",
            "< open a b >",
            "< open can/0 >",
            &format!("< open {sixteen}a >"),
        ] {
            assert_eq!(
                parse(bad).map_err(|e| e.label()),
                Err("bad_arguments"),
                "{bad}"
            );
        }
    }

    #[test]
    fn parses_sends_as_python_can_and_socketcand_write_them() {
        assert_eq!(
            parse("< send 123 0 >"),
            Ok(Command::Send(frame(0x123, &[])))
        );
        assert_eq!(
            parse("< send 123 0  >"),
            Ok(Command::Send(frame(0x123, &[])))
        );
        assert_eq!(
            parse("< send 1AAAAAAA 2 1 F1 >"),
            Ok(Command::Send(frame(0x1AAA_AAAA | CAN_EFF_FLAG, &[1, 0xF1])))
        );
        assert_eq!(
            parse("< send 1aaaaaaa 2 1 f1 >"),
            Ok(Command::Send(frame(0x1AAA_AAAA | CAN_EFF_FLAG, &[1, 0xF1])))
        );
        assert_eq!(
            parse("<send 7FF 8 0 1 2 3 4 5 6 ff>"),
            Ok(Command::Send(frame(0x7FF, &[0, 1, 2, 3, 4, 5, 6, 0xFF])))
        );
    }

    #[test]
    fn eight_id_digits_make_an_extended_id_whatever_the_value() {
        assert_eq!(
            parse("< send 00000123 0 >"),
            Ok(Command::Send(frame(0x123 | CAN_EFF_FLAG, &[])))
        );
        assert_eq!(
            parse("< send 0123 0 >"),
            Ok(Command::Send(frame(0x123, &[])))
        );
    }

    #[test]
    fn rejects_bad_ids() {
        assert!(reason(parse("< send 800 0 >")).contains("write an extended id with 8 hex digits"));
        assert!(reason(parse("< send 0000800 0 >")).contains("above 7FF"));
        assert!(reason(parse("< send 20000000 0 >")).contains("above 1FFFFFFF"));
        assert!(reason(parse("< send 123456789 0 >")).contains("'123456789'"));
        assert!(reason(parse("< send 12G 0 >")).contains("'12G'"));
        assert!(reason(parse("< send +12 0 >")).contains("'+12'"));
        assert!(reason(parse("< send >")).contains("expected an id"));
        assert!(reason(parse("< send 123 >")).contains("expected an id"));
    }

    #[test]
    fn rejects_bad_lengths_and_data() {
        assert!(reason(parse("< send 123 9 1 2 3 4 5 6 7 8 9 >")).contains("'9'"));
        assert!(reason(parse("< send 123 10 >")).contains("'10'"));
        assert!(reason(parse("< send 123 x >")).contains("'x'"));
        assert_eq!(
            reason(parse("< send 123 2 1 >")),
            "length 2 but 1 data bytes"
        );
        assert_eq!(
            reason(parse("< send 123 1 1 2 >")),
            "length 1 but 2 data bytes"
        );
        assert!(reason(parse("< send 123 1 100 >")).contains("'100'"));
        assert!(reason(parse("< send 123 1 -1 >")).contains("'-1'"));
        assert!(reason(parse("< send 123 1 g >")).contains("'g'"));
    }

    #[test]
    fn recognises_unsupported_commands_by_name() {
        for name in &UNSUPPORTED_COMMANDS[..12] {
            assert_eq!(
                parse(&format!("< {name} whatever 1 2 >")),
                Ok(Command::Unsupported(name)),
                "{name}"
            );
        }
        assert_eq!(
            parse("< can0 B 500000 875 0 0 0 0 0 0 >"),
            Ok(Command::Unsupported("bittiming"))
        );
        assert_eq!(
            parse("< can0 C 0 1 0 >"),
            Ok(Command::Unsupported("ctrlmode"))
        );
        assert_eq!(
            parse("< can0 X 1 >"),
            Err(ProtocolError::Unknown("can0".to_string()))
        );
    }

    #[test]
    fn unknown_words_are_quoted_safely() {
        let long = "x".repeat(100);
        assert_eq!(
            parse(&format!("< {long} >")),
            Err(ProtocolError::Unknown("x".repeat(32)))
        );
        assert_eq!(
            parse("< a\0b\x7f >"),
            Err(ProtocolError::Unknown("a?b?".to_string()))
        );
    }

    #[test]
    fn text_a_splitter_would_not_return_is_refused_the_same_way() {
        assert_eq!(parse("< >"), Err(ProtocolError::Empty));
        assert_eq!(parse("<>"), Err(ProtocolError::Empty));
        assert_eq!(parse("echo"), Err(ProtocolError::Unframed));
        assert_eq!(parse("< echo"), Err(ProtocolError::Unframed));
        assert_eq!(parse("< a < echo >"), Err(ProtocolError::Unframed));
        assert_eq!(parse("< é >"), Err(ProtocolError::NotAscii));
        assert_eq!(
            parse(&format!("<{}>", " ".repeat(MAX_COMMAND_LEN))),
            Err(ProtocolError::TooLong {
                limit: MAX_COMMAND_LEN
            })
        );
    }

    #[test]
    fn labels_and_fatality() {
        let errors = [
            ProtocolError::TooLong { limit: 1 },
            ProtocolError::NotAscii,
            ProtocolError::Unframed,
            ProtocolError::Empty,
            ProtocolError::Unknown(String::new()),
            bad("send", String::new()),
        ];
        let labels: Vec<&str> = errors.iter().map(ProtocolError::label).collect();
        assert_eq!(labels, ProtocolError::LABELS);
        let fatal: Vec<bool> = errors.iter().map(ProtocolError::is_fatal).collect();
        assert_eq!(fatal, [true, false, false, false, false, false]);
    }

    #[test]
    fn formats_frames_as_socketcand_raw_mode() {
        let at = Duration::new(23, 424_242_999);
        let cases = [
            (
                frame(0x123, &[0x11, 0x22, 0x33, 0x44]),
                "< frame 123 23.424242 11223344 >",
            ),
            (frame(0x123, &[]), "< frame 123 23.424242  >"),
            (frame(0x5, &[0xAB]), "< frame 005 23.424242 AB >"),
            (
                frame(0x1AAA_AAAA | CAN_EFF_FLAG, &[1, 0xF1]),
                "< frame 1AAAAAAA 23.424242 01F1 >",
            ),
            (
                frame(0x123 | CAN_EFF_FLAG, &[0; 8]),
                "< frame 00000123 23.424242 0000000000000000 >",
            ),
            (
                frame(0x4 | CAN_ERR_FLAG, &[0, 4, 0, 0, 0, 0, 0, 0]),
                "< error 004 23.424242 >",
            ),
        ];
        for (frame, expected) in cases {
            let mut out = String::from("before ");
            assert!(format_frame(&frame, at, &mut out), "{expected}");
            assert_eq!(out, format!("before {expected}"));
        }
        let mut out = String::new();
        assert!(format_frame(
            &frame(0x1, &[]),
            Duration::new(1_700_000_000, 5_000),
            &mut out
        ));
        assert_eq!(out, "< frame 001 1700000000.000005  >");
    }

    #[test]
    fn refuses_fd_and_remote_frames() {
        let mut out = String::new();
        let fd = Frame::fd(0x123, 0, &[1; 12]).expect("fd frame");
        let remote = Frame::remote(0x123, 4).expect("remote frame");
        assert!(!format_frame(&fd, Duration::ZERO, &mut out));
        assert!(!format_frame(&remote, Duration::ZERO, &mut out));
        assert!(out.is_empty());
        assert_eq!(format_send(&fd), None);
        assert_eq!(format_send(&remote), None);
        assert_eq!(format_send(&frame(CAN_ERR_FLAG | 4, &[])), None);
    }

    #[test]
    fn python_can_reads_what_format_frame_writes() {
        let cases = [
            frame(0x123, &[0x11, 0x22, 0x33, 0x44]),
            frame(0x0, &[]),
            frame(0x7FF, &[0xFF; 8]),
            frame(0x1FFF_FFFF | CAN_EFF_FLAG, &[]),
            frame(0x1 | CAN_EFF_FLAG, &[0, 0x80]),
        ];
        let at = Duration::new(1_700_000_000, 123_456_000);
        for frame in cases {
            let mut out = String::new();
            assert!(format_frame(&frame, at, &mut out));
            let (id, ts, is_ext, data) = python_can_frame(&out).expect(&out);
            assert_eq!(id, frame.id() & CAN_EFF_MASK, "{out}");
            assert_eq!(is_ext, frame.is_extended(), "{out}");
            assert_eq!(data, frame.data(), "{out}");
            assert!((ts - 1_700_000_000.123_456).abs() < 1e-5, "{out}");
        }
    }

    #[test]
    fn format_send_writes_what_python_can_writes_and_parse_reads_it() {
        let cases = [
            (frame(0x123, &[1, 2, 0xFF]), "< send 123 3 1 2 ff >"),
            (frame(0x123, &[]), "< send 123 0 >"),
            (
                frame(0x1AAA_AAAA | CAN_EFF_FLAG, &[1, 0xF1]),
                "< send 1AAAAAAA 2 1 f1 >",
            ),
            (frame(0x7, &[0; 8]), "< send 007 8 0 0 0 0 0 0 0 0 >"),
        ];
        for (frame, expected) in cases {
            let text = format_send(&frame).expect("a send");
            assert_eq!(text, expected);
            assert_eq!(parse(&text), Ok(Command::Send(frame)));
        }
    }

    #[test]
    fn error_replies_stay_one_ascii_command() {
        assert_eq!(format_error("unknown command"), "< error unknown command >");
        assert_eq!(
            format_error("bytes outside < > é\n"),
            "< error bytes outside ( ) ?? >"
        );
        let reply = format_error(&ProtocolError::Unknown("x".to_string()).to_string());
        assert_eq!(split_all(reply.as_bytes()), vec![Ok(reply.clone())]);
    }

    #[test]
    fn constants_are_single_commands() {
        for text in [HELLO, OK, ECHO] {
            assert_eq!(split_all(text.as_bytes()), vec![ok(text)]);
        }
        assert_eq!(parse(HELLO), Err(ProtocolError::Unknown("hi".to_string())));
    }
}
