//! Support code for vcan-plugin's tests that need real SocketCAN.
//!
//! The development hosts' kernel has no CAN support, so such tests run in the CAN test-bed VM
//! (`cargo xtask vm-test`), which boots Debian's stock kernel with the CAN modules loaded and
//! runs the host-built test binaries with `--ignored`. The workspace convention is:
//!
//! ```text
//! #[test]
//! #[ignore = "needs the CAN test-bed VM"]
//! fn creates_a_vcan() {
//!     vcan_test_support::require_testbed();
//!     let ns = vcan_test_support::NetnsFixture::new();
//!     ns.ip(&["link", "add", "vcan0", "type", "vcan"]);
//!     // ...
//! }
//! ```
//!
//! Every `#[ignore]`d test is a VM test; the helpers here panic with a message instead of
//! returning errors, which is what a failing test should do.
//!
//! With the `kubelet` feature, [`kubelet`] is the project's one kubelet stand-in, shared by the
//! plugin's host tests and the end-to-end tests (it returns errors: the e2e harness reports them
//! with context).

#![deny(missing_docs)]

#[cfg(feature = "kubelet")]
pub mod kubelet;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The variable the test-bed VM sets to `1` for the tests it runs.
pub const TESTBED_ENV: &str = "VCAN_TESTBED";

/// The ignore reason VM tests carry (`#[ignore]` takes only a literal, so this is for reference
/// and for tools that check the convention).
pub const IGNORE_REASON: &str = "needs the CAN test-bed VM";

/// iproute2's `ip`, by full path: busybox's `ip` applet, earlier on some PATHs, knows neither
/// `type vcan` nor `netns`.
pub const IP: &str = "/sbin/ip";

/// Where the kernel lists the CAN sockets' receive filters of the reading process's network
/// namespace.
const RCVLIST_ALL: &str = "/proc/net/can/rcvlist_all";

/// Panics unless this process runs in the CAN test-bed VM with a kernel that has vcan.
///
/// Call it first in every VM test, so that running `--ignored` tests on a host fails with an
/// explanation instead of an obscure netlink error.
pub fn require_testbed() {
    let env = std::env::var(TESTBED_ENV).ok();
    let vcan_loaded = Path::new("/sys/module/vcan").exists();
    if let Err(why) = check_testbed(env.as_deref(), vcan_loaded) {
        panic!("{}", not_in_testbed_message(&why));
    }
}

fn not_in_testbed_message(why: &str) -> String {
    format!("this test needs the CAN test-bed VM: run `cargo xtask vm-test` ({why})")
}

/// The decision behind [`require_testbed`], separated so it can be tested anywhere.
fn check_testbed(env: Option<&str>, vcan_loaded: bool) -> Result<(), String> {
    if env != Some("1") {
        return Err(format!("{TESTBED_ENV} is not set to 1"));
    }
    if !vcan_loaded {
        return Err("the kernel has no vcan module loaded (/sys/module/vcan)".into());
    }
    Ok(())
}

/// A fresh named network namespace (`ip netns add`), deleted again on drop.
///
/// Names are unique per process and fixture, so tests running in parallel never share one.
#[derive(Debug)]
pub struct NetnsFixture {
    name: String,
}

impl NetnsFixture {
    /// Creates a namespace named `vcantest-<pid>-<n>`; panics if `ip netns add` fails.
    pub fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("vcantest-{}-{n}", std::process::id());
        let out = command_output(Command::new(IP).args(["netns", "add", &name]));
        assert_success(&out, &format!("ip netns add {name}"));
        Self { name }
    }

    /// The namespace's name, as `ip netns` and `/run/netns/<name>` know it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's file, `/run/netns/<name>`, as the plugin's `Netns::Path` takes it.
    pub fn path(&self) -> std::path::PathBuf {
        std::path::Path::new("/run/netns").join(&self.name)
    }

    /// Runs `ip -n <name> <args>` and panics unless it succeeds; returns its stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = command_output(Command::new(IP).arg("-n").arg(&self.name).args(args));
        assert_success(&out, &format!("ip -n {} {}", self.name, args.join(" ")));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a command inside the namespace and panics unless it succeeds; returns its stdout.
    pub fn run_ok(&self, program: &str, args: &[&str]) -> String {
        let out = run_in_netns(&self.name, program, args);
        assert_success(
            &out,
            &format!("{program} {} (in {})", args.join(" "), self.name),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Default for NetnsFixture {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetnsFixture {
    fn drop(&mut self) {
        // Best effort: failing here would turn a test failure into a double panic (abort).
        let _ = Command::new(IP).args(["netns", "del", &self.name]).output();
    }
}

/// Runs `program args...` inside the named network namespace (`ip netns exec`) and returns its
/// output, whatever its exit status. Panics only if `ip` cannot be started.
pub fn run_in_netns(netns: &str, program: &str, args: &[&str]) -> Output {
    command_output(
        Command::new(IP)
            .args(["netns", "exec", netns, program])
            .args(args),
    )
}

/// Waits until a CAN socket in `netns` has a receive filter on `ifname`, i.e. a listener such as
/// `candump` has bound; panics after `timeout`.
///
/// Starting a listener in the background and sending right away is racy: under the VM's TCG
/// emulation a listener can take seconds to bind. The kernel lists bound receivers in
/// `/proc/net/can/rcvlist_all` (per network namespace), which this polls.
pub fn wait_for_can_listener(netns: &str, ifname: &str, timeout: Duration) {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < timeout {
        let out = run_in_netns(netns, "cat", &[RCVLIST_ALL]);
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        if rcvlist_has_receiver(&last, ifname) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "no CAN receiver on {ifname} in netns {netns} after {timeout:?}; {RCVLIST_ALL}:\n{last}"
    );
}

/// True when a `rcvlist_*` listing has an entry for `ifname`. Entries start with the device
/// name; the header and the `(vcan0: no entry)` placeholders do not count.
fn rcvlist_has_receiver(listing: &str, ifname: &str) -> bool {
    listing
        .lines()
        .any(|line| line.split_whitespace().next() == Some(ifname))
}

/// Runs `program args...` and panics unless it succeeds; returns its stdout.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = command_output(Command::new(program).args(args));
    assert_success(&out, &format!("{program} {}", args.join(" ")));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn command_output(cmd: &mut Command) -> Output {
    match cmd.output() {
        Ok(out) => out,
        Err(err) => panic!("cannot run {:?}: {err}", cmd.get_program()),
    }
}

fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "`{what}` failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn testbed_needs_both_the_variable_and_vcan() {
        assert!(check_testbed(Some("1"), true).is_ok());
        assert!(check_testbed(None, true).is_err());
        assert!(check_testbed(Some("0"), true).is_err());
        let err = check_testbed(Some("1"), false).expect_err("no vcan");
        assert!(err.contains("vcan"), "{err}");
    }

    #[test]
    fn rcvlist_entries_are_told_from_placeholders() {
        let listing = "
receive list 'rx_all':
  (vcan0: no entry)
receive list 'rx_fil':
  device   can_id   can_mask      function          userdata       matches  ident
   vcan0     000    00000000  000000005e8bf951  0000000050c5ce20         0  raw
";
        assert!(rcvlist_has_receiver(listing, "vcan0"));
        assert!(!rcvlist_has_receiver(listing, "vcan1"));
        assert!(!rcvlist_has_receiver("  (vcan0: no entry)\n", "vcan0"));
    }

    #[test]
    fn the_panic_message_says_how_to_run_vm_tests() {
        let msg = not_in_testbed_message("VCAN_TESTBED is not set to 1");
        assert!(
            msg.starts_with("this test needs the CAN test-bed VM"),
            "{msg}"
        );
        assert!(msg.contains("`cargo xtask vm-test`"), "{msg}");
    }
}

/// One rule as `cangw -L` (can-utils) prints it, e.g.
/// `cangw -A -s m0000 -d m0001 -X -i -f 123:C00007FF # 0 handled 0 dropped 0 deleted`: an
/// independent reader of the kernel's can-gw rules.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct CangwListed {
    /// `-s`: the source interface.
    pub src: String,
    /// `-d`: the destination interface.
    pub dst: String,
    /// The other options (`-X`, `-i`, ...), sorted and space-separated.
    pub flags: String,
    /// `-f ID:MASK`, if the rule has a filter.
    pub filter: Option<String>,
    /// The numbers after `#`: handled, dropped, deleted.
    pub counts: Vec<u32>,
}

/// Parses the non-empty lines of a `cangw -L` listing; panics on a line of another shape.
pub fn parse_cangw_listing(text: &str) -> Vec<CangwListed> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let (options, counts) = line.split_once(" # ").unwrap_or((line, ""));
            let mut tokens = options.split_whitespace();
            assert_eq!(
                (tokens.next(), tokens.next()),
                (Some("cangw"), Some("-A")),
                "unexpected cangw -L line {line:?} in:\n{text}"
            );
            let (mut src, mut dst, mut filter) = (String::new(), String::new(), None);
            let mut flags = std::collections::BTreeSet::new();
            while let Some(token) = tokens.next() {
                match token {
                    "-s" => src = tokens.next().unwrap_or_default().to_string(),
                    "-d" => dst = tokens.next().unwrap_or_default().to_string(),
                    "-f" => filter = tokens.next().map(str::to_string),
                    flag => {
                        flags.insert(flag);
                    }
                }
            }
            CangwListed {
                src,
                dst,
                flags: flags.into_iter().collect::<Vec<_>>().join(" "),
                filter,
                counts: counts
                    .split_whitespace()
                    .filter_map(|w| w.parse().ok())
                    .collect(),
            }
        })
        .collect()
}
