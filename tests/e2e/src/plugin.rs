//! The vcan-plugin daemon as a child process, with its configuration pointed at the stand-in
//! kubelet's directories.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// The daemon binary built alongside the tests (`VCAN_PLUGIN_BIN` overrides it).
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("VCAN_PLUGIN_BIN") {
        return PathBuf::from(path);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/debug/vcan-plugin")
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from("target/debug/vcan-plugin"))
}

/// Where the daemon finds the kubelet and the runtime.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// `--device-plugin-dir`.
    pub device_plugin_dir: PathBuf,
    /// `--pod-resources-socket`.
    pub pod_resources_socket: PathBuf,
    /// `--containerd-socket`.
    pub containerd_socket: PathBuf,
    /// `--metrics-address`.
    pub metrics_address: String,
    /// `--resource-name`.
    pub resource_name: String,
    /// `--devices`.
    pub devices: u32,
    /// Where its log goes.
    pub log: PathBuf,
    /// Further arguments (e.g. `--bus-config FILE`).
    pub extra_args: Vec<String>,
    /// The named network namespace (`ip netns`, under /run/netns) to run in, as a second node
    /// would; the node's own namespace if `None`. Only the network namespace changes: the
    /// daemon keeps the node's mounts, so the bus namespaces it bind-mounts outlive it as on a
    /// real node (`ip netns exec` would give it a mount namespace of its own).
    pub netns: Option<String>,
}

/// A running daemon; killed on drop.
#[derive(Debug)]
pub struct Plugin {
    child: Child,
    config: PluginConfig,
}

impl Plugin {
    /// Starts the daemon.
    pub fn start(config: &PluginConfig) -> Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&config.log)
            .with_context(|| format!("open {}", config.log.display()))?;
        let mut command = match &config.netns {
            Some(ns) => {
                // nsenter execs the daemon in place, so the child's pid is the daemon's.
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg(binary());
                c
            }
            None => Command::new(binary()),
        };
        let child = command
            .arg("--device-plugin-dir")
            .arg(&config.device_plugin_dir)
            .arg("--pod-resources-socket")
            .arg(&config.pod_resources_socket)
            .arg("--containerd-socket")
            .arg(&config.containerd_socket)
            .args(["--metrics-address", &config.metrics_address])
            .args(["--resource-name", &config.resource_name])
            .args(["--devices", &config.devices.to_string()])
            .args(&config.extra_args)
            .env("RUST_LOG", "vcan_plugin=debug,info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("start {}", binary().display()))?;
        Ok(Plugin {
            child,
            config: config.clone(),
        })
    }

    /// Stops the daemon with SIGTERM (as the kubelet does to a pod), waiting for it to exit.
    pub fn stop(&mut self) -> Result<()> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        for _ in 0..100 {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child.kill()?;
        self.child.wait()?;
        bail!("vcan-plugin did not exit within 5 s of SIGTERM")
    }

    /// Stops and starts it again with the same configuration.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        *self = Plugin::start(&self.config)?;
        Ok(())
    }

    /// Kills the daemon with SIGKILL (no clean-up at all, as a crash or the OOM killer) and
    /// starts it again with the same configuration.
    pub fn kill_and_restart(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        *self = Plugin::start(&self.config)?;
        Ok(())
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.config.log).unwrap_or_default()
    }

    /// The value of the series `series` (name and labels exactly as exported), if the plugin has
    /// one and its metrics answer.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.http_get("/metrics").ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
    }

    /// `GET path` on the metrics address; returns (status, body).
    pub fn http_get(&self, path: &str) -> Result<(u16, String)> {
        http_get(&self.config.metrics_address, path)
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 GET, enough for the plugin's own endpoints.
pub fn http_get(address: &str, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect(address).with_context(|| format!("connect to {address}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    Ok((status, body.to_string()))
}
