//! The control socket itself: the daemon's server ([`serve`]) and the client ([`request`]).

use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::request::{Reply, Request, RequestError};

/// Longest request line the server reads, without its newline. A request is a few hundred
/// bytes; the limit only keeps a confused client from growing the daemon's memory.
pub const MAX_REQUEST_LINE: usize = 4096;

/// Longest reply line the client reads: a listing of many faults is long, but not this long.
pub const MAX_REPLY_LINE: usize = 1 << 20;

/// How long the server waits for a client's next request (or for it to take a reply) before
/// closing the connection, so that forgotten clients do not hold one of the few connections.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many connections are served at once; more are answered with an error and closed.
pub const MAX_CONNECTIONS: usize = 8;

/// How long the client waits for the daemon's reply.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The permissions of the socket: only the daemon's user (root) may connect.
const SOCKET_MODE: u32 = 0o600;

/// What answers requests: implemented by the daemon (it knows the buses).
///
/// Requests reach it validated ([`Request::validate`]). It is called on a blocking thread, so
/// it may take locks, but it should answer promptly: the client waits.
pub trait Handler: Send + Sync + 'static {
    /// The reply to `request`.
    fn handle(&self, request: Request) -> Reply;
}

/// Why the control socket could not be served or asked.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The request is invalid (found before sending it).
    #[error(transparent)]
    Request(#[from] RequestError),
    /// Something other than a socket is where the socket goes.
    #[error(
        "{} exists and is not a socket: move it away or give another --control-socket",
        path.display()
    )]
    NotASocket {
        /// The socket's path.
        path: PathBuf,
    },
    /// The socket could not be created.
    #[error("cannot listen on the control socket {}: {source}", path.display())]
    Listen {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Nothing serves the socket.
    #[error(
        "cannot connect to the control socket {}: {source}. Is this the plugin's pod (run the \
         command with kubectl exec in the vcan-plugin pod on the bus's node), and is the daemon \
         running? (The socket is <state-dir>/control.sock unless --control-socket says \
         otherwise.)",
        path.display()
    )]
    Unavailable {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Sending the request or reading the reply failed.
    #[error("control socket {}: {source}", path.display())]
    Io {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The daemon did not reply in time.
    #[error("control socket {}: no reply within {} s", path.display(), after.as_secs())]
    Timeout {
        /// The socket's path.
        path: PathBuf,
        /// How long the client waited.
        after: Duration,
    },
    /// The daemon's reply could not be read.
    #[error("control socket {}: {message}", path.display())]
    BadReply {
        /// The socket's path.
        path: PathBuf,
        /// What is wrong with the reply.
        message: String,
    },
}

/// The server's limits; tests shorten them.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_line: usize,
    idle: Duration,
    connections: usize,
}

impl Limits {
    const DEFAULT: Limits = Limits {
        max_line: MAX_REQUEST_LINE,
        idle: IDLE_TIMEOUT,
        connections: MAX_CONNECTIONS,
    };
}

/// Serves `handler` on the Unix socket `path` until `shutdown`, then removes the socket.
///
/// A socket already at `path` is taken to be left by an earlier instance and replaced;
/// anything else there is refused. The socket is created with mode 0600 whatever the umask.
pub async fn serve(
    path: &Path,
    handler: Arc<dyn Handler>,
    shutdown: CancellationToken,
) -> Result<(), ControlError> {
    serve_with(path, handler, shutdown, Limits::DEFAULT).await
}

async fn serve_with(
    path: &Path,
    handler: Arc<dyn Handler>,
    shutdown: CancellationToken,
    limits: Limits,
) -> Result<(), ControlError> {
    let (listener, _bound) = bind(path)?;
    tracing::info!(path = %path.display(), "control socket listening");
    let permits = Arc::new(Semaphore::new(limits.connections));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let permit = Arc::clone(&permits).try_acquire_owned().ok();
                    connections.spawn(connection(stream, Arc::clone(&handler), permit, limits));
                }
                Err(e) => {
                    // Out of descriptors, typically: pause instead of spinning on the error.
                    tracing::warn!(error = %e, "control socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "control socket: a connection failed");
                }
            }
        }
    }
    connections.shutdown().await;
    tracing::info!(path = %path.display(), "control socket closed");
    Ok(())
}

/// The socket at a path, removed when dropped if it is still the one this server made: when
/// an old instance shuts down after a new one has taken the path over, the new one's socket
/// stays.
struct Bound {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for Bound {
    fn drop(&mut self) {
        match fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.dev() == self.dev && meta.ino() == self.ino => {
                if let Err(e) = fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the control socket");
                }
            }
            Ok(_) => tracing::info!(
                path = %self.path.display(),
                "the control socket was replaced by another instance; leaving it"
            ),
            Err(_) => {}
        }
    }
}

fn bind(path: &Path) -> Result<(UnixListener, Bound), ControlError> {
    let listen_err = |source| ControlError::Listen {
        path: path.to_path_buf(),
        source,
    };
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            tracing::info!(path = %path.display(), "replacing a control socket left by an earlier instance");
        }
        Ok(_) => {
            return Err(ControlError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(listen_err(e)),
    }
    let Some(file_name) = path.file_name() else {
        return Err(listen_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path does not name a file",
        )));
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::create_dir_all(parent).map_err(listen_err)?;

    // bind(2) creates the socket with the umask's permissions, and a client that connects
    // before a chmod keeps its connection. So the socket is made in a directory only the
    // daemon's user can enter, restricted, then renamed into place, which also replaces a stale
    // socket without a moment where the path is missing.
    let staging = parent.join(format!(".{}.bind", file_name.to_string_lossy()));
    // Left by a crash: in a container the daemon is always pid 1, so a per-pid name would not
    // avoid it either.
    match fs::remove_dir_all(&staging) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(listen_err(e)),
    }
    DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(listen_err)?;
    let temporary = staging.join("s");
    let bound = (|| {
        let listener = UnixListener::bind(&temporary)?;
        fs::set_permissions(&temporary, fs::Permissions::from_mode(SOCKET_MODE))?;
        fs::rename(&temporary, path)?;
        let meta = fs::symlink_metadata(path)?;
        Ok::<_, io::Error>((
            listener,
            Bound {
                path: path.to_path_buf(),
                dev: meta.dev(),
                ino: meta.ino(),
            },
        ))
    })();
    if let Err(e) = fs::remove_dir_all(&staging) {
        tracing::warn!(path = %staging.display(), error = %e, "cannot remove the control socket's staging directory");
    }
    bound.map_err(listen_err)
}

/// One client: requests and replies, line by line, until it closes, idles or misbehaves.
async fn connection(
    stream: UnixStream,
    handler: Arc<dyn Handler>,
    permit: Option<OwnedSemaphorePermit>,
    limits: Limits,
) {
    // Who asked, for the log: the socket is the only way in, so this is the audit trail.
    let (uid, pid) = match stream.peer_cred() {
        Ok(cred) => (Some(cred.uid()), cred.pid()),
        Err(_) => (None, None),
    };
    let (read, mut write) = stream.into_split();
    if permit.is_none() {
        let busy = Reply::error(format!(
            "the daemon is serving {} control connections already: try again shortly",
            limits.connections
        ));
        let _ = send(&mut write, &busy, limits.idle).await;
        return;
    }
    let mut reader = BufReader::new(read);
    loop {
        let line = match tokio::time::timeout(limits.idle, read_line(&mut reader, limits.max_line))
            .await
        {
            Err(_) => {
                tracing::debug!(?uid, ?pid, "control socket: closing an idle connection");
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(?uid, ?pid, error = %e, "control socket: read failed");
                return;
            }
            Ok(Ok(Line::End)) => return,
            Ok(Ok(Line::TooLong)) => {
                // The rest of the line is unread, so there is no next request to find.
                let reply = Reply::error(format!(
                    "request line longer than {} bytes: send one JSON request per line",
                    limits.max_line
                ));
                let _ = send(&mut write, &reply, limits.idle).await;
                return;
            }
            Ok(Ok(Line::Complete(line))) => line,
        };
        let reply = answer(&line, &handler, uid, pid).await;
        if send(&mut write, &reply, limits.idle).await.is_err() {
            return;
        }
    }
}

async fn answer(
    line: &[u8],
    handler: &Arc<dyn Handler>,
    uid: Option<u32>,
    pid: Option<i32>,
) -> Reply {
    let request: Request = match serde_json::from_slice(line) {
        Ok(request) => request,
        Err(e) => {
            return Reply::error(format!(
                "invalid request: {e}: send one JSON object per line, e.g. {{\"op\":\"list\"}}"
            ));
        }
    };
    if let Err(e) = request.validate() {
        return Reply::error(e);
    }
    match &request {
        Request::List { .. } => tracing::debug!(?request, ?uid, ?pid, "control request"),
        _ => tracing::info!(?request, ?uid, ?pid, "control request"),
    }
    let handler = Arc::clone(handler);
    match tokio::task::spawn_blocking(move || handler.handle(request)).await {
        Ok(reply) => {
            if let Reply::Error { message } = &reply {
                tracing::info!(%message, "control request refused");
            }
            reply
        }
        Err(e) => {
            tracing::error!(error = %e, "control request handler failed");
            Reply::error("the daemon failed to handle the request: see its log")
        }
    }
}

async fn send(
    write: &mut (impl AsyncWriteExt + Unpin),
    reply: &Reply,
    deadline: Duration,
) -> io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(io::Error::other)?;
    line.push(b'\n');
    tokio::time::timeout(deadline, write.write_all(&line))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

/// One line read.
enum Line {
    /// The line without its newline (a last line without one counts too).
    Complete(Vec<u8>),
    /// The line is longer than the limit; it is read only up to there.
    TooLong,
    /// The peer closed without starting another line.
    End,
}

async fn read_line(reader: &mut (impl AsyncBufRead + Unpin), max: usize) -> io::Result<Line> {
    let mut line = Vec::new();
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(if line.is_empty() {
                Line::End
            } else {
                Line::Complete(line)
            });
        }
        let (take, complete) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (buf.len(), false),
        };
        if line.len() + take > max {
            return Ok(Line::TooLong);
        }
        line.extend_from_slice(&buf[..take]);
        reader.consume(if complete { take + 1 } else { take });
        if complete {
            return Ok(Line::Complete(line));
        }
    }
}

/// Sends `request` to the daemon serving `path` and returns its reply.
///
/// The request is validated first, so that a mistake is reported without a round trip.
pub async fn request(path: &Path, request: &Request) -> Result<Reply, ControlError> {
    request.validate()?;
    let io_err = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| ControlError::Unavailable {
            path: path.to_path_buf(),
            source,
        })?;
    let mut line = serde_json::to_vec(request).map_err(|e| io_err(io::Error::other(e)))?;
    line.push(b'\n');
    let (read, mut write) = stream.into_split();
    let exchange = async {
        // A busy daemon replies and closes without reading: its reply is still there to read.
        let written = write.write_all(&line).await;
        match read_line(&mut BufReader::new(read), MAX_REPLY_LINE).await {
            Ok(Line::End) => written.map(|()| Line::End),
            read => read,
        }
    };
    let reply = match tokio::time::timeout(CLIENT_TIMEOUT, exchange).await {
        Err(_) => {
            return Err(ControlError::Timeout {
                path: path.to_path_buf(),
                after: CLIENT_TIMEOUT,
            });
        }
        Ok(Err(e)) => return Err(io_err(e)),
        Ok(Ok(Line::Complete(reply))) => reply,
        Ok(Ok(Line::TooLong)) => {
            return Err(ControlError::BadReply {
                path: path.to_path_buf(),
                message: format!("the reply is longer than {MAX_REPLY_LINE} bytes"),
            });
        }
        Ok(Ok(Line::End)) => {
            return Err(ControlError::BadReply {
                path: path.to_path_buf(),
                message: "the daemon closed the connection without replying".into(),
            });
        }
    };
    serde_json::from_slice(&reply).map_err(|e| ControlError::BadReply {
        path: path.to_path_buf(),
        message: format!("invalid reply: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::super::request::{ActiveFault, FaultKind, Inject, Target};
    use super::*;

    /// Answers every request with the request it got, and remembers them.
    #[derive(Default)]
    struct Echo {
        seen: Mutex<Vec<Request>>,
    }

    impl Handler for Echo {
        fn handle(&self, request: Request) -> Reply {
            if let Ok(mut seen) = self.seen.lock() {
                seen.push(request.clone());
            }
            match request {
                Request::Inject(inject) => Reply::Ok {
                    message: format!("injected on {}", inject.bus),
                    faults: vec![ActiveFault {
                        bus: inject.bus,
                        target: inject.target,
                        kind: inject.kind,
                        remaining: Duration::from_millis(200),
                    }],
                },
                Request::Clear { bus, .. } => Reply::error(format!("no bus {bus}")),
                Request::List { .. } => Reply::Ok {
                    message: "no faults".into(),
                    faults: Vec::new(),
                },
            }
        }
    }

    struct Server {
        _dir: tempfile::TempDir,
        path: PathBuf,
        echo: Arc<Echo>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<Result<(), ControlError>>,
    }

    impl Server {
        async fn start(limits: Limits) -> Server {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("control.sock");
            Server::start_at(dir, path, limits).await
        }

        async fn start_at(dir: tempfile::TempDir, path: PathBuf, limits: Limits) -> Server {
            let echo = Arc::new(Echo::default());
            let shutdown = CancellationToken::new();
            let task = tokio::spawn({
                let (path, echo, shutdown) = (path.clone(), Arc::clone(&echo), shutdown.clone());
                async move { serve_with(&path, echo, shutdown, limits).await }
            });
            // Until the rename, the path is absent or the stale socket.
            for _ in 0..500 {
                if UnixStream::connect(&path).await.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Server {
                _dir: dir,
                path,
                echo,
                shutdown,
                task,
            }
        }

        async fn stop(self) -> PathBuf {
            self.shutdown.cancel();
            self.task.await.expect("joined").expect("served");
            self.path
        }

        /// Writes `bytes` raw and returns the first reply line.
        async fn raw(&self, bytes: &[u8]) -> String {
            let mut stream = UnixStream::connect(&self.path).await.expect("connects");
            // A refused connection may be closed before the request is written.
            let _ = stream.write_all(bytes).await;
            let mut reply = String::new();
            BufReader::new(stream)
                .read_line(&mut reply)
                .await
                .expect("reads");
            reply
        }
    }

    fn inject() -> Request {
        Request::Inject(Inject {
            bus: "chassis".into(),
            target: Target::pod("default/ecu-a").expect("pod"),
            kind: FaultKind::BusOff {
                restart: Duration::from_millis(200),
            },
        })
    }

    #[tokio::test]
    async fn requests_round_trip_and_the_socket_is_removed_on_shutdown() {
        let server = Server::start(Limits::DEFAULT).await;
        let reply = request(&server.path, &inject()).await.expect("a reply");
        let Reply::Ok { message, faults } = reply else {
            panic!("not ok: {reply:?}");
        };
        assert_eq!(message, "injected on chassis");
        assert_eq!(faults.len(), 1);
        let refused = request(
            &server.path,
            &Request::Clear {
                bus: "x".into(),
                target: None,
            },
        )
        .await
        .expect("a reply");
        assert_eq!(refused, Reply::error("no bus x"));
        assert_eq!(
            server.echo.seen.lock().expect("lock").first(),
            Some(&inject())
        );

        // Several requests on one connection.
        let mut stream = UnixStream::connect(&server.path).await.expect("connects");
        stream
            .write_all(b"{\"op\":\"list\"}\n{\"op\":\"list\",\"bus\":\"b\"}\n")
            .await
            .expect("writes");
        let mut lines = BufReader::new(stream).lines();
        for _ in 0..2 {
            let line = lines.next_line().await.expect("reads").expect("a line");
            assert_eq!(line, r#"{"status":"ok","message":"no faults","faults":[]}"#);
        }

        let path = server.stop().await;
        assert!(!path.exists(), "the socket is removed");
    }

    #[tokio::test]
    async fn the_socket_is_for_its_owner_only() {
        let server = Server::start(Limits::DEFAULT).await;
        let meta = fs::symlink_metadata(&server.path).expect("exists");
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let parent = server.path.parent().expect("parent");
        let leftovers: Vec<_> = fs::read_dir(parent)
            .expect("lists")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(leftovers, ["control.sock"], "no staging directory left");
        server.stop().await;
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("control.sock");
        // A socket nobody listens on any more, as a killed daemon leaves it.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("binds"));
        assert!(UnixStream::connect(&path).await.is_err());
        let server = Server::start_at(dir, path, Limits::DEFAULT).await;
        let reply = request(&server.path, &Request::List { bus: None }).await;
        assert!(matches!(reply, Ok(Reply::Ok { .. })), "{reply:?}");
        server.stop().await;
    }

    #[tokio::test]
    async fn a_regular_file_at_the_path_is_refused_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("control.sock");
        fs::write(&path, "precious").expect("writes");
        let err = serve(&path, Arc::new(Echo::default()), CancellationToken::new())
            .await
            .expect_err("refused");
        assert!(matches!(err, ControlError::NotASocket { .. }), "{err}");
        assert!(err.to_string().contains("is not a socket"), "{err}");
        assert_eq!(fs::read_to_string(&path).expect("kept"), "precious");
    }

    #[tokio::test]
    async fn bad_json_gets_an_error_naming_the_problem() {
        let server = Server::start(Limits::DEFAULT).await;
        let reply = server.raw(b"{\"op\":\"list\"\n").await;
        let reply: Reply = serde_json::from_str(&reply).expect("a reply");
        let Reply::Error { message } = reply else {
            panic!("not an error: {reply:?}");
        };
        assert!(message.starts_with("invalid request: "), "{message}");

        let reply = server.raw(b"{\"op\":\"reboot\"}\n").await;
        assert!(reply.contains("unknown variant `reboot`"), "{reply}");

        // Valid JSON, invalid request: the handler never sees it.
        let reply = server
            .raw(b"{\"op\":\"inject\",\"bus\":\"b\",\"target\":\"all\",\"kind\":{\"type\":\"drop\",\"probability\":2,\"duration_ms\":10}}\n")
            .await;
        assert!(reply.contains("probability 2 is out of range"), "{reply}");
        assert!(server.echo.seen.lock().expect("lock").is_empty());
        server.stop().await;
    }

    #[tokio::test]
    async fn a_long_line_gets_an_error_and_the_connection_closes() {
        let server = Server::start(Limits::DEFAULT).await;
        let mut long = vec![b' '; MAX_REQUEST_LINE + 1];
        long.push(b'\n');
        let reply = server.raw(&long).await;
        assert!(
            reply.contains("request line longer than 4096 bytes"),
            "{reply}"
        );

        // Exactly at the limit is still a request.
        let mut padded = br#"{"op":"list"}"#.to_vec();
        padded.resize(MAX_REQUEST_LINE, b' ');
        padded.push(b'\n');
        assert!(server.raw(&padded).await.contains("\"status\":\"ok\""));
        server.stop().await;
    }

    #[tokio::test]
    async fn idle_and_surplus_clients_are_turned_away() {
        let limits = Limits {
            idle: Duration::from_millis(100),
            connections: 1,
            ..Limits::DEFAULT
        };
        let server = Server::start(limits).await;
        // The one connection, shown to hold the permit by an answer (start's probe may still
        // hold it for a moment).
        let mut idle = loop {
            let stream = UnixStream::connect(&server.path).await.expect("connects");
            let mut stream = BufReader::new(stream);
            // A refused connection may be closed before the request is written.
            let _ = stream.get_mut().write_all(b"{\"op\":\"list\"}\n").await;
            let mut reply = String::new();
            stream.read_line(&mut reply).await.expect("reads");
            if reply.contains("\"status\":\"ok\"") {
                break stream;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let busy = server.raw(b"{\"op\":\"list\"}\n").await;
        assert!(busy.contains("1 control connections already"), "{busy}");

        let mut rest = Vec::new();
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read_to_end(&mut idle, &mut rest),
        )
        .await;
        assert!(matches!(read, Ok(Ok(0))), "closed without a reply");
        server.stop().await;
    }

    #[tokio::test]
    async fn a_missing_socket_asks_whether_the_daemon_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = request(
            &dir.path().join("control.sock"),
            &Request::List { bus: None },
        )
        .await
        .expect_err("no daemon");
        assert!(matches!(err, ControlError::Unavailable { .. }), "{err}");
        assert!(err.to_string().contains("is the daemon running"), "{err}");
    }
}
