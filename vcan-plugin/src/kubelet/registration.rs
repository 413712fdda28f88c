//! Serving the plugin socket and registering with the kubelet, again after every kubelet restart.
//!
//! A restarting kubelet closes every plugin connection, deletes every file in its device-plugin
//! directory (the plugin's socket too) and only then listens on a new `kubelet.sock`. Each
//! registrar runs one loop for its resource, built on two rules:
//!
//! - never register an endpoint whose file is not there: before every attempt, and again once the
//!   kubelet's socket has answered (its clean-up is over by then), the plugin socket must be the
//!   file being served (same inode), else it is bound anew;
//! - every restart signal (inotify on the directory, the ListAndWatch stream closing, a slow
//!   periodic check) leads back to that check, and failed attempts back off (100 ms doubling to
//!   5 s) with the directory's burst of events coalesced into one attempt.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use inotify::{Inotify, WatchMask};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::api::deviceplugin::v1beta1::RegisterRequest;
use crate::api::deviceplugin::v1beta1::device_plugin_server::DevicePluginServer;
use crate::api::deviceplugin::v1beta1::registration_client::RegistrationClient;
use crate::api::{DEVICE_PLUGIN_API_VERSION, KUBELET_SOCKET_NAME};
use crate::kubelet::plugin::{self, PluginService, Streams};
use crate::serve::ResourceServer;
use crate::telemetry::health::Health;
use crate::telemetry::metrics::Metrics;
use crate::uds;

/// Shortest and longest wait between registration attempts that failed.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// How long the directory must stay quiet after an event before the next attempt: a kubelet's
/// clean-up is a burst of deletions followed by the creation of its socket.
pub const QUIET: Duration = Duration::from_millis(100);
/// Fallback check for a restarted kubelet, should an inotify event be missed.
pub const RECHECK: Duration = Duration::from_secs(2);
/// Longest a Register call may take: the kubelet dials back with a 10 s timeout before answering.
const REGISTER_DEADLINE: Duration = Duration::from_secs(15);

/// Why the registration loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// The device-plugin directory is unusable.
    #[error(
        "cannot use the kubelet's device-plugin directory {dir}: {source} (mount \
         /var/lib/kubelet/device-plugins into the plugin or set --device-plugin-dir)"
    )]
    Directory {
        /// The directory.
        dir: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Why one registration attempt failed; the loop retries.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("cannot serve the plugin socket {path}: {source}")]
    Bind {
        path: String,
        source: std::io::Error,
    },
    #[error("the kubelet's socket {0} is not there yet")]
    NoKubelet(String),
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: String,
        source: tonic::transport::Error,
    },
    #[error("the plugin socket was removed while registering; binding it again")]
    SocketGone,
    #[error("the kubelet refused the registration: {0}")]
    Refused(String),
    #[error("the kubelet did not answer the registration within {0:?}")]
    Deadline(Duration),
}

/// Serves one resource's device-plugin socket and keeps it registered until shutdown.
pub struct Registrar {
    dir: PathBuf,
    socket_name: String,
    server: Arc<ResourceServer>,
    metrics: Arc<Metrics>,
    health: watch::Receiver<Health>,
    registered: Arc<AtomicBool>,
    /// The ListAndWatch streams: the kubelet closing one means it went away.
    streams: Arc<Streams>,
}

impl std::fmt::Debug for Registrar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registrar")
            .field("socket", &self.socket_path())
            .finish_non_exhaustive()
    }
}

fn inode(path: &Path) -> Option<u64> {
    std::fs::symlink_metadata(path).ok().map(|m| m.ino())
}

/// The server of one bound socket file.
struct Serving {
    inode: u64,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Serving {
    async fn stop(self) {
        self.stop.cancel();
        // Graceful shutdown is quick: the token also ends the ListAndWatch streams.
        let _ = tokio::time::timeout(Duration::from_millis(500), self.task).await;
    }
}

impl Registrar {
    /// A registrar serving `server`'s resource in the device-plugin directory `dir`.
    pub fn new(
        dir: &Path,
        server: Arc<ResourceServer>,
        metrics: Arc<Metrics>,
        health: watch::Receiver<Health>,
    ) -> Self {
        Registrar {
            dir: dir.to_path_buf(),
            socket_name: server.resource().socket_name(),
            server,
            metrics,
            health,
            registered: Arc::new(AtomicBool::new(false)),
            streams: Arc::new(Streams::default()),
        }
    }

    /// A flag that is true while the kubelet has accepted the current registration.
    pub fn registered_flag(&self) -> Arc<AtomicBool> {
        self.registered.clone()
    }

    /// The plugin's socket path.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.join(&self.socket_name)
    }

    fn kubelet_socket(&self) -> PathBuf {
        self.dir.join(KUBELET_SOCKET_NAME)
    }

    /// Runs until `shutdown`; removes the plugin socket on the way out.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), RegistrationError> {
        let dir_error = |source| RegistrationError::Directory {
            dir: self.dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(dir_error)?;
        let inotify = Inotify::init().map_err(dir_error)?;
        inotify
            .watches()
            .add(
                &self.dir,
                WatchMask::CREATE | WatchMask::DELETE | WatchMask::MOVED_TO | WatchMask::MOVED_FROM,
            )
            .map_err(dir_error)?;
        let mut events = inotify.into_event_stream([0u8; 4096]).map_err(dir_error)?;

        let mut serving: Option<Serving> = None;
        let mut delay = BACKOFF.0;
        let resource = self.server.resource().to_string();
        loop {
            // Streams opened from now on belong to this attempt's registration.
            let floor = self.streams.opened();
            let attempt = self.attempt(&mut serving).await;
            let wait = match attempt {
                Ok(kubelet_inode) => {
                    self.registered.store(true, Ordering::SeqCst);
                    tracing::info!(%resource, endpoint = %self.socket_name, "registered with the kubelet");
                    delay = BACKOFF.0;
                    let stopped = self
                        .watch_registration(&mut events, &serving, kubelet_inode, floor, &shutdown)
                        .await;
                    self.registered.store(false, Ordering::SeqCst);
                    if stopped {
                        break;
                    }
                    // A restart: try again as soon as the directory is quiet.
                    QUIET
                }
                Err(e) => {
                    let wait = delay;
                    delay = (delay * 2).min(BACKOFF.1);
                    match e {
                        AttemptError::NoKubelet(_) => {
                            tracing::debug!(%resource, error = %e, retry_in = ?wait, "waiting for the kubelet")
                        }
                        _ => {
                            tracing::warn!(%resource, error = %e, retry_in = ?wait, "registration with the kubelet failed")
                        }
                    }
                    wait
                }
            };
            if self.pause(&mut events, wait, &shutdown).await {
                break;
            }
        }
        if let Some(s) = serving.take() {
            s.stop().await;
        }
        let _ = std::fs::remove_file(self.socket_path());
        Ok(())
    }

    /// One attempt: make sure the socket file is the one served, then register. Returns the
    /// inode of the kubelet socket that accepted.
    async fn attempt(&self, serving: &mut Option<Serving>) -> Result<u64, AttemptError> {
        self.ensure_serving(serving).await?;
        let kubelet = self.kubelet_socket();
        let kubelet_inode = inode(&kubelet)
            .ok_or_else(|| AttemptError::NoKubelet(kubelet.display().to_string()))?;
        let channel = tokio::time::timeout(REGISTER_DEADLINE, uds::connect(&kubelet))
            .await
            .map_err(|_| AttemptError::Deadline(REGISTER_DEADLINE))?
            .map_err(|source| AttemptError::Connect {
                path: kubelet.display().to_string(),
                source,
            })?;
        // The kubelet cleans its directory before it listens: now that it answered, a socket of
        // ours still in place will stay, and one that went must be bound again first.
        let served = serving.as_ref().map(|s| s.inode);
        if served.is_none() || inode(&self.socket_path()) != served {
            return Err(AttemptError::SocketGone);
        }
        let mut request = tonic::Request::new(RegisterRequest {
            version: DEVICE_PLUGIN_API_VERSION.to_string(),
            endpoint: self.socket_name.clone(),
            resource_name: self.server.resource().to_string(),
            options: Some(plugin::options()),
        });
        request.set_timeout(REGISTER_DEADLINE);
        match tokio::time::timeout(
            REGISTER_DEADLINE,
            RegistrationClient::new(channel).register(request),
        )
        .await
        {
            Err(_) => Err(AttemptError::Deadline(REGISTER_DEADLINE)),
            Ok(Err(status)) => Err(AttemptError::Refused(uds::status_text(&status))),
            Ok(Ok(_)) => Ok(kubelet_inode),
        }
    }

    /// Binds the socket anew unless the file in place is the one being served.
    async fn ensure_serving(&self, serving: &mut Option<Serving>) -> Result<(), AttemptError> {
        let path = self.socket_path();
        if let Some(s) = serving.as_ref()
            && inode(&path) == Some(s.inode)
        {
            return Ok(());
        }
        if let Some(old) = serving.take() {
            old.stop().await;
        }
        let bind_error = |source| AttemptError::Bind {
            path: path.display().to_string(),
            source,
        };
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_error(e)),
        }
        let listener = UnixListener::bind(&path).map_err(bind_error)?;
        let inode = inode(&path).ok_or_else(|| {
            bind_error(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the socket file vanished right after binding",
            ))
        })?;
        let stop = CancellationToken::new();
        let service = PluginService::new(
            self.server.clone(),
            self.metrics.clone(),
            self.health.clone(),
            stop.clone(),
            self.streams.clone(),
        );
        tracing::info!(socket = %path.display(), "serving the device-plugin API");
        let token = stop.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = Server::builder()
                .add_service(DevicePluginServer::new(service))
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(listener),
                    token.cancelled_owned(),
                )
                .await
            {
                tracing::error!(error = %e, "device-plugin server failed");
            }
        });
        *serving = Some(Serving { inode, stop, task });
        Ok(())
    }

    /// Waits while registered; returns true on shutdown, false when the kubelet restarted (its
    /// socket replaced, ours removed or replaced, or its ListAndWatch stream closed).
    async fn watch_registration<S>(
        &self,
        events: &mut S,
        serving: &Option<Serving>,
        kubelet_inode: u64,
        floor: u64,
        shutdown: &CancellationToken,
    ) -> bool
    where
        S: futures::Stream + Unpin,
    {
        let own_inode = serving.as_ref().map(|s| s.inode);
        let mut recheck = tokio::time::interval(RECHECK);
        let mut lost = self.streams.lost();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return true,
                _ = events.next() => {}
                _ = recheck.tick() => {}
                _ = lost.changed() => {}
            };
            // Only a stream of this registration tells; older ones close as the kubelet or the
            // plugin moves on.
            let stream_lost = *lost.borrow_and_update() > floor;
            let socket_gone = inode(&self.socket_path()) != own_inode;
            let kubelet_new = inode(&self.kubelet_socket()) != Some(kubelet_inode);
            if socket_gone || kubelet_new || stream_lost {
                tracing::warn!(
                    resource = %self.server.resource(),
                    socket_gone,
                    kubelet_new,
                    stream_lost,
                    "kubelet restarted: registering again"
                );
                return false;
            }
        }
    }

    /// Waits `wait`, or less once the directory changed and then stayed quiet for [`QUIET`];
    /// returns true on shutdown.
    async fn pause<S>(&self, events: &mut S, wait: Duration, shutdown: &CancellationToken) -> bool
    where
        S: futures::Stream + Unpin,
    {
        let until = Instant::now() + wait;
        let mut deadline = until;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return true,
                () = tokio::time::sleep_until(deadline) => return false,
                _ = events.next() => deadline = until.min(Instant::now() + QUIET),
            }
        }
    }
}
