//! Running qemu: the command line, the console capture and the timeout.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The line stage 2 prints right before the job starts; streaming begins after it, so the
/// firmware's terminal escapes and boot noise stay in the log file.
pub const JOB_MARKER: &str = "vmtest: running job";
/// The line stage 2 prints when the job has ended; streaming stops there.
pub const JOB_END_MARKER: &str = "vmtest: job finished";

/// Everything one qemu run needs.
pub struct Qemu<'a> {
    /// Uncompressed ELF kernel (PVH entry).
    pub vmlinux: &'a Path,
    /// Stage-1 initramfs.
    pub initramfs: &'a Path,
    /// Kernel command line.
    pub cmdline: String,
    /// Host directory shared writable as the 9p tag `results`.
    pub results_share: &'a Path,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Guest CPUs.
    pub cpus: u32,
    /// Where the serial console is written.
    pub console_log: &'a Path,
    /// Copy the console to stdout from [`JOB_MARKER`] on (or everything, with `stream_all`).
    pub stream: bool,
    /// Stream the whole console, boot included (debugging).
    pub stream_all: bool,
    /// Hard limit for the whole VM run.
    pub timeout: Duration,
}

/// How the qemu process ended.
#[derive(Debug)]
pub enum Exit {
    /// qemu exited by itself (guest powered off, or rebooted after a panic).
    Exited(ExitStatus),
    /// qemu was killed after the timeout.
    TimedOut,
}

/// Emulated physical CAN controllers (Kvaser PCIcan, SJA1000): two emulated buses with two
/// controllers each, at fixed PCI addresses so tests can name them as a hardware configuration
/// would (`0000:00:10.0` … `0000:00:13.0`). Each bus pairs a controller under test with one that
/// plays the ECU. They stay without a netdev until a test loads `kvaser_pci`.
const CAN_CONTROLLERS: &[&str] = &[
    "-object",
    "can-bus,id=canbus0",
    "-device",
    "kvaser_pci,canbus=canbus0,addr=0x10",
    "-device",
    "kvaser_pci,canbus=canbus0,addr=0x11",
    "-object",
    "can-bus,id=canbus1",
    "-device",
    "kvaser_pci,canbus=canbus1,addr=0x12",
    "-device",
    "kvaser_pci,canbus=canbus1,addr=0x13",
];

impl Qemu<'_> {
    fn command(&self) -> Command {
        let mut cmd = Command::new("qemu-system-x86_64");
        // KVM is present but unusable on these hosts (-cpu host aborts, qemu64 hangs in the
        // firmware). A 256 MiB translation cache cuts qemu's RSS from ~1.5 to ~0.65 GiB at no
        // measurable cost.
        cmd.args(["-accel", "tcg,tb-size=256"])
            .arg("-m")
            .arg(self.memory_mib.to_string())
            .arg("-smp")
            .arg(self.cpus.to_string())
            .args(["-nographic", "-no-reboot", "-nic", "none"])
            .args(["-device", "virtio-rng-pci"])
            .args(CAN_CONTROLLERS)
            .arg("-kernel")
            .arg(self.vmlinux)
            .arg("-initrd")
            .arg(self.initramfs)
            .arg("-append")
            .arg(&self.cmdline)
            .arg("-virtfs")
            .arg("local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap")
            .arg("-virtfs")
            .arg(format!(
                "local,path={},mount_tag=results,security_model=none",
                qemu_escape(&self.results_share.to_string_lossy())
            ));
        cmd
    }

    /// Boots the VM and waits until it stops or the timeout passes.
    pub fn run(&self) -> Result<Exit> {
        let log = File::create(self.console_log)
            .with_context(|| format!("cannot create {}", self.console_log.display()))?;
        let mut cmd = self.command();
        // -nographic puts the serial console (muxed with the monitor) on stdio; stdin stays
        // closed so nothing typed reaches the monitor, and stderr shares the log.
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log.try_clone()?));
        let mut child = cmd
            .spawn()
            .context("cannot start qemu-system-x86_64 (`cargo xtask setup` installs it)")?;
        let reader = self.spawn_console_reader(&mut child, log)?;

        let deadline = Instant::now() + self.timeout;
        let exit = loop {
            if let Some(status) = child.try_wait()? {
                break Exit::Exited(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break Exit::TimedOut;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // qemu's exit closes the pipe, which ends the reader.
        if reader.join().is_err() {
            bail!("console reader thread panicked");
        }
        Ok(exit)
    }

    fn spawn_console_reader(&self, child: &mut Child, mut log: File) -> Result<JoinHandle<()>> {
        let stdout = child.stdout.take().context("qemu stdout not captured")?;
        let (stream, stream_all) = (self.stream, self.stream_all);
        Ok(std::thread::spawn(move || {
            let mut streaming = stream_all;
            let mut reader = BufReader::new(stdout);
            let mut line = Vec::new();
            let mut out = std::io::stdout();
            // A failing write to the log or stdout must not stop the draining of the pipe,
            // or qemu would block on a full pipe.
            while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                let _ = log.write_all(&line);
                // The marker can share a line with firmware output that lacks a newline.
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end();
                if !stream_all && text.ends_with(JOB_MARKER) {
                    streaming = stream;
                } else if !stream_all && text.ends_with(JOB_END_MARKER) {
                    // Output without a final newline runs into the marker line.
                    let rest = &text[..text.len() - JOB_END_MARKER.len()];
                    if streaming && !rest.is_empty() {
                        let _ = writeln!(out, "{rest}");
                    }
                    streaming = false;
                } else if streaming {
                    let _ = out.write_all(&clean_line(&line, stream_all));
                    let _ = out.flush();
                }
                line.clear();
            }
            let _ = log.flush();
        }))
    }
}

/// qemu's option parser ends a value at a comma unless it is doubled.
fn qemu_escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// Turns the console's CRLF into LF; before the job, also drops terminal escapes (the firmware
/// clears the screen).
fn clean_line(line: &[u8], strip_escapes: bool) -> Vec<u8> {
    let mut text = if strip_escapes {
        strip_ansi(line)
    } else {
        line.to_vec()
    };
    while text.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        text.pop();
    }
    if line.ends_with(b"\n") {
        text.push(b'\n');
    }
    text
}

fn strip_ansi(line: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len());
    let mut i = 0;
    while i < line.len() {
        if line[i] == 0x1b {
            i += 1;
            if line.get(i) == Some(&b'[') {
                i += 1;
                while i < line.len() && !(0x40..=0x7e).contains(&line[i]) {
                    i += 1;
                }
            }
            i += 1; // the final byte (or the single character after ESC, as in ESC c)
        } else {
            out.push(line[i]);
            i += 1;
        }
    }
    out
}

/// The last `n` lines of a console log, cleaned up for printing.
pub fn console_tail(log: &Path, n: usize) -> String {
    let Ok(bytes) = std::fs::read(log) else {
        return format!("(no console log at {})", log.display());
    };
    let text = String::from_utf8_lossy(&strip_ansi(&bytes)).replace('\r', "");
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A per-run directory under the VM cache, holding the console log and the results share.
#[derive(Debug, Clone)]
pub struct RunDir {
    /// The run directory itself.
    pub dir: PathBuf,
    /// The results share (`/run/vmtest` in the guest).
    pub share: PathBuf,
    /// The serial console log.
    pub console_log: PathBuf,
}

impl RunDir {
    /// Creates `runs/<name>-<pid>/` after removing earlier runs of the same name whose process
    /// is gone, so at most the latest run of each kind (plus live ones) stays around.
    pub fn create(cache: &Path, name: &str) -> Result<Self> {
        let runs = cache.join("runs");
        std::fs::create_dir_all(&runs)?;
        for entry in std::fs::read_dir(&runs)? {
            let entry = entry?;
            let file_name = entry.file_name();
            let Some(pid) = file_name
                .to_str()
                .and_then(|n| n.strip_prefix(name))
                .and_then(|rest| rest.strip_prefix('-'))
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new("/proc").join(pid.to_string()).exists() || pid == std::process::id() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let run = Self::of(cache, name);
        std::fs::create_dir_all(&run.share)
            .with_context(|| format!("cannot create {}", run.share.display()))?;
        Ok(run)
    }

    /// The paths of this process's run named `name`, whether or not it exists yet.
    pub fn of(cache: &Path, name: &str) -> Self {
        let dir = cache
            .join("runs")
            .join(format!("{name}-{}", std::process::id()));
        Self {
            console_log: dir.join("console.log"),
            share: dir.join("share"),
            dir,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_firmware_escapes() {
        let line = b"\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16.2)\r\n";
        assert_eq!(clean_line(line, true), b"SeaBIOS (version 1.16.2)\n");
        assert_eq!(clean_line(b"\x1b[1mbold\r\n", false), b"\x1b[1mbold\n");
    }

    #[test]
    fn escapes_commas_for_qemu() {
        assert_eq!(qemu_escape("/a,b"), "/a,,b");
    }
}
