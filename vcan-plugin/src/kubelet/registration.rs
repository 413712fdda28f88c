//! Serving the plugin socket and registering with the kubelet, again after every kubelet restart.
//!
//! A restarting kubelet deletes every socket in its device-plugin directory and creates a new
//! `kubelet.sock`. The plugin watches the directory with inotify and, when either its own socket
//! disappears or `kubelet.sock` is replaced, binds a fresh socket and registers again. The decision
//! is made on the files' identities (inodes), not on the events alone, so events caused by the
//! plugin's own re-bind never trigger another cycle; a slow periodic check covers missed events.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use inotify::{Inotify, WatchMask};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::api::deviceplugin::v1beta1::RegisterRequest;
use crate::api::deviceplugin::v1beta1::device_plugin_server::DevicePluginServer;
use crate::api::deviceplugin::v1beta1::registration_client::RegistrationClient;
use crate::api::{DEVICE_PLUGIN_API_VERSION, KUBELET_SOCKET_NAME};
use crate::health::Health;
use crate::injector::Injector;
use crate::kubelet::plugin::{self, PluginService};
use crate::uds;

/// Shortest and longest wait between registration attempts while the kubelet is away.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// Fallback check for a restarted kubelet, should an inotify event be missed.
const RECHECK: Duration = Duration::from_secs(2);

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
    /// The plugin socket could not be bound.
    #[error("cannot serve the plugin socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Serves the plugin and keeps it registered until `shutdown` is cancelled.
#[derive(Debug)]
pub struct Registrar {
    dir: PathBuf,
    socket_name: String,
    injector: Arc<Injector>,
    health: watch::Receiver<Health>,
    registered: Arc<AtomicBool>,
}

fn inode(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

impl Registrar {
    /// A registrar serving `injector` in the device-plugin directory `dir`.
    pub fn new(dir: &Path, injector: Arc<Injector>, health: watch::Receiver<Health>) -> Self {
        Registrar {
            dir: dir.to_path_buf(),
            socket_name: injector.resource().socket_name(),
            injector,
            health,
            registered: Arc::new(AtomicBool::new(false)),
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

        let result = loop {
            let generation = CancellationToken::new();
            let server = match self.serve(generation.clone()) {
                Ok(server) => server,
                Err(e) => break Err(e),
            };
            let own_inode = inode(&self.socket_path());

            let kubelet_inode = tokio::select! {
                () = shutdown.cancelled() => { generation.cancel(); let _ = server.await; break Ok(()); }
                inode = self.register_with_backoff(&mut events) => inode,
            };
            self.registered.store(true, Ordering::SeqCst);

            // Wait until the kubelet restarts (or our socket is removed), then start over.
            let mut recheck = tokio::time::interval(RECHECK);
            loop {
                let stop = tokio::select! {
                    () = shutdown.cancelled() => true,
                    _ = events.next() => false,
                    _ = recheck.tick() => false,
                };
                if stop {
                    self.registered.store(false, Ordering::SeqCst);
                    generation.cancel();
                    let _ = server.await;
                    let _ = std::fs::remove_file(self.socket_path());
                    return Ok(());
                }
                let socket_gone = inode(&self.socket_path()) != own_inode;
                let kubelet_new = inode(&self.kubelet_socket()) != kubelet_inode;
                if socket_gone || kubelet_new {
                    tracing::warn!(
                        socket_gone,
                        kubelet_new,
                        "kubelet restarted: re-binding and registering again"
                    );
                    break;
                }
            }
            self.registered.store(false, Ordering::SeqCst);
            generation.cancel();
            // Graceful shutdown is quick: the generation token ends the streams.
            let _ = tokio::time::timeout(Duration::from_millis(500), server).await;
        };
        let _ = std::fs::remove_file(self.socket_path());
        result
    }

    /// Binds a fresh plugin socket and serves the device-plugin service on it.
    fn serve(
        &self,
        generation: CancellationToken,
    ) -> Result<tokio::task::JoinHandle<()>, RegistrationError> {
        let path = self.socket_path();
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(RegistrationError::Bind {
                    path: path.display().to_string(),
                    source,
                });
            }
        }
        let listener = UnixListener::bind(&path).map_err(|source| RegistrationError::Bind {
            path: path.display().to_string(),
            source,
        })?;
        let service = PluginService::new(
            self.injector.clone(),
            self.health.clone(),
            generation.clone(),
        );
        tracing::info!(socket = %path.display(), "serving the device-plugin API");
        Ok(tokio::spawn(async move {
            if let Err(e) = Server::builder()
                .add_service(DevicePluginServer::new(service))
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(listener),
                    generation.cancelled_owned(),
                )
                .await
            {
                tracing::error!(error = %e, "device-plugin server failed");
            }
        }))
    }

    /// Registers, retrying with backoff (and at once when `kubelet.sock` appears) until the
    /// kubelet accepts; returns the inode of the kubelet socket that accepted.
    async fn register_with_backoff<S>(&self, events: &mut S) -> Option<u64>
    where
        S: futures::Stream + Unpin,
    {
        let mut delay = BACKOFF.0;
        loop {
            let kubelet_inode = inode(&self.kubelet_socket());
            match self.register().await {
                Ok(()) => {
                    tracing::info!(
                        resource = %self.injector.resource(),
                        endpoint = %self.socket_name,
                        "registered with the kubelet"
                    );
                    return kubelet_inode;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "registration with the kubelet failed");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = events.next() => {}
            }
            delay = (delay * 2).min(BACKOFF.1);
        }
    }

    async fn register(&self) -> Result<(), String> {
        let path = self.kubelet_socket();
        let channel = uds::connect(&path)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
        RegistrationClient::new(channel)
            .register(RegisterRequest {
                version: DEVICE_PLUGIN_API_VERSION.to_string(),
                endpoint: self.socket_name.clone(),
                resource_name: self.injector.resource().to_string(),
                options: Some(plugin::options()),
            })
            .await
            .map_err(|s| format!("the kubelet refused: {}", s.message()))?;
        Ok(())
    }
}
