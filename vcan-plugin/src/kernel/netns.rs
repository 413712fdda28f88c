//! Running code inside another network namespace.
//!
//! A network namespace belongs to a thread, not to a process, so entering one on a tokio worker would
//! move every task that later runs on that worker into the pod's namespace. Everything here therefore
//! happens on a fresh OS thread that enters the target namespace, does its work and exits; the
//! calling thread's namespace is never changed. This is the only module that calls `setns` (and
//! the only one that creates namespaces).

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// A network namespace, named by a bind-mounted path or by a process living in it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Netns {
    /// A namespace file, such as `/var/run/netns/cni-…` (what containerd creates for a pod sandbox).
    Path(PathBuf),
    /// The network namespace of a process, `/proc/<pid>/ns/net`.
    Pid(u32),
}

impl Netns {
    /// The file that refers to this namespace.
    pub fn path(&self) -> PathBuf {
        match self {
            Netns::Path(p) => p.clone(),
            Netns::Pid(pid) => PathBuf::from(format!("/proc/{pid}/ns/net")),
        }
    }
}

impl fmt::Display for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Netns::Path(p) => write!(f, "{}", p.display()),
            Netns::Pid(pid) => write!(f, "pid {pid}"),
        }
    }
}

/// Why a namespace could not be entered.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file does not exist: the pod is gone or the path is wrong.
    #[error(
        "network namespace {0} does not exist: the pod sandbox may have been removed, or the \
         namespace directory is not mounted into the plugin (mount /var/run/netns with \
         HostToContainer propagation)"
    )]
    NotFound(String),
    /// The namespace file exists but could not be opened.
    #[error("cannot open network namespace {ns}: {source}")]
    Open {
        /// The namespace.
        ns: String,
        /// The error from `open`.
        source: io::Error,
    },
    /// The path exists but is not a namespace in this process's view: typically the mount that
    /// made it a namespace did not propagate into the plugin's container.
    #[error(
        "{0} is not a network namespace in the plugin's view: mount /var/run/netns into the plugin \
         with HostToContainer propagation from a shared host mount (`mount --make-rshared /` on \
         nodes without systemd)"
    )]
    NotANamespace(String),
    /// `setns` failed: the file is not a network namespace, or the process lacks CAP_SYS_ADMIN.
    #[error(
        "cannot enter network namespace {ns}: {source} (is it a network namespace file, and does \
         the plugin have CAP_SYS_ADMIN?)"
    )]
    Enter {
        /// The namespace.
        ns: String,
        /// The error from `setns`.
        source: io::Error,
    },
    /// The helper thread could not be started or panicked.
    #[error("namespace worker thread failed: {0}")]
    Thread(String),
}

/// Opens the namespace file, mapping a missing file to [`NetnsError::NotFound`]. The file refers
/// to the namespace for as long as it is open (what `IFLA_NET_NS_FD` needs).
pub(crate) fn open(ns: &Netns) -> Result<File, NetnsError> {
    let path = ns.path();
    File::open(&path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            NetnsError::NotFound(ns.to_string())
        } else {
            NetnsError::Open {
                ns: ns.to_string(),
                source,
            }
        }
    })
}

/// Whether `file` lives on nsfs, the filesystem of namespace files. containerd creates an empty
/// placeholder file and bind-mounts the namespace over it; without mount propagation the plugin
/// sees only the placeholder.
fn is_nsfs(file: &File) -> bool {
    const NSFS_MAGIC: libc::c_long = 0x6e73_6673;
    // SAFETY: fstatfs fills the zeroed struct for a valid fd.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::fstatfs(file.as_raw_fd(), &mut st) == 0 && st.f_type as libc::c_long == NSFS_MAGIC
    }
}

/// Runs `f` on a new OS thread that has entered `ns`, and returns its result.
///
/// Blocks the caller until `f` returns; from async code call it inside `spawn_blocking`. Sockets
/// opened by `f` stay in `ns` after the thread exits, so the usual pattern is to open a netlink socket
/// here and use it from anywhere.
pub fn run<T, F>(ns: &Netns, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    // Opening before spawning reports a missing namespace without paying for a thread.
    let file = open(ns)?;
    if !is_nsfs(&file) {
        return Err(NetnsError::NotANamespace(ns.to_string()));
    }
    let name = ns.to_string();
    let handle = std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || -> Result<T, NetnsError> {
            // SAFETY: setns only changes this thread's namespace; the fd is valid for the call.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(NetnsError::Enter {
                    ns: name,
                    source: io::Error::last_os_error(),
                });
            }
            Ok(f())
        })
        .map_err(|e| NetnsError::Thread(e.to_string()))?;
    handle
        .join()
        .map_err(|_| NetnsError::Thread("the worker panicked".into()))?
}

/// Runs `f` on a new OS thread inside a new, empty network namespace, which the kernel destroys
/// (with every link in it) once the thread exits and nothing else refers to it.
///
/// Used to probe what the kernel supports without touching any real namespace.
pub fn run_in_new<T, F>(f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let handle = std::thread::Builder::new()
        .name("netns-probe".into())
        .spawn(move || -> Result<T, NetnsError> {
            // SAFETY: unshare only changes this thread's network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(NetnsError::Enter {
                    ns: "a new namespace".into(),
                    source: io::Error::last_os_error(),
                });
            }
            Ok(f())
        })
        .map_err(|e| NetnsError::Thread(e.to_string()))?;
    handle
        .join()
        .map_err(|_| NetnsError::Thread("the worker panicked".into()))?
}

/// A new, empty network namespace that lives exactly as long as this process: a parked thread
/// holds it, and the kernel destroys it (with every link in it, and a vxcan's peer with its end)
/// when the process exits, however it exits. Nothing in it is reachable from the node's namespace
/// or outlives an uninstall.
pub fn process_private() -> Result<Netns, NetnsError> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("netns-private".into())
        .spawn(move || {
            // SAFETY: unshare only changes this thread's network namespace.
            let entered = if unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0 {
                // SAFETY: gettid has no preconditions.
                Ok(unsafe { libc::gettid() })
            } else {
                Err(io::Error::last_os_error())
            };
            let ok = entered.is_ok();
            let _ = tx.send(entered);
            if ok {
                loop {
                    std::thread::park();
                }
            }
        })
        .map_err(|e| NetnsError::Thread(e.to_string()))?;
    let tid = rx
        .recv()
        .map_err(|e| NetnsError::Thread(e.to_string()))?
        .map_err(|source| NetnsError::Enter {
            ns: "a new namespace".into(),
            source,
        })?;
    Ok(Netns::Path(PathBuf::from(format!(
        "/proc/{}/task/{tid}/ns/net",
        std::process::id()
    ))))
}

/// Makes `path` name a network namespace that outlives the plugin: reuses the namespace already
/// bind-mounted there, or creates a new, empty one and bind-mounts it onto `path` (what
/// `ip netns add` does). Returns whether a namespace was created.
///
/// The namespace lives as long as the mount, not as long as any process, so it survives plugin
/// restarts; it must be on a mount that propagates to the node (a hostPath with Bidirectional
/// propagation) for a restarted plugin container to see it.
pub fn create_persistent(path: &Path) -> Result<bool, NetnsError> {
    let ns = Netns::Path(path.to_path_buf());
    match File::open(path) {
        Ok(file) if is_nsfs(&file) => return Ok(false),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(NetnsError::Open {
                ns: ns.to_string(),
                source,
            });
        }
    }
    let open_error = |source| NetnsError::Open {
        ns: ns.to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(open_error)?;
    }
    // The mount point: an empty file, as for `ip netns add`.
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(open_error)?;
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| open_error(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let name = ns.to_string();
    // A new namespace on a thread of its own, pinned by the bind mount before the thread ends
    // (mounts belong to the process, the namespace only to the thread).
    let result = run_in_new(move || -> Result<(), NetnsError> {
        let source = c"/proc/thread-self/ns/net";
        // SAFETY: both paths are valid NUL-terminated strings; a bind mount takes no data.
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(NetnsError::Open {
                ns: name,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    })
    .and_then(|r| r);
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result.map(|()| true)
}

/// Destroys a namespace made by [`create_persistent`]: unmounts `path` (the kernel frees the
/// namespace, and every interface in it, once nothing else refers to it) and removes the file.
/// Returns whether there was one.
pub fn remove_persistent(path: &Path) -> Result<bool, NetnsError> {
    let ns = Netns::Path(path.to_path_buf());
    let error = |source| NetnsError::Open {
        ns: ns.to_string(),
        source,
    };
    if !path.exists() {
        return Ok(false);
    }
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| error(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: a valid NUL-terminated path; MNT_DETACH never blocks on users of the namespace.
    let rc = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        // EINVAL: not a mount point (a leftover placeholder file); removing it is all there is.
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(error(e));
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(error(e)),
    }
}

/// Whether `path` is the node's network namespace (that of PID 1 in the plugin's view) or the
/// plugin's own: namespaces no pod should ever get interfaces in. Compares device and inode.
pub fn is_node_namespace(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let Some(target) = id(path) else {
        return false;
    };
    ["/proc/1/ns/net", "/proc/self/ns/net"]
        .iter()
        .any(|own| id(Path::new(own)) == Some(target))
}

/// The inode of a namespace file: two paths name the same namespace exactly when their inodes match.
pub fn inode(path: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_namespace_is_reported_with_its_path() {
        let err = run(&Netns::Path("/var/run/netns/does-not-exist".into()), || ())
            .expect_err("a missing namespace must fail");
        assert!(matches!(err, NetnsError::NotFound(_)), "{err:?}");
        assert!(err.to_string().contains("/var/run/netns/does-not-exist"));
    }

    #[test]
    fn a_file_that_is_not_a_namespace_cannot_be_entered() {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        let err = run(&Netns::Path(file.path().into()), || ()).expect_err("must fail");
        assert!(matches!(err, NetnsError::NotANamespace(_)), "{err:?}");
        assert!(err.to_string().contains("HostToContainer"), "{err}");
    }

    #[test]
    fn a_new_namespace_is_empty_and_separate() {
        let own = inode(Path::new("/proc/thread-self/ns/net")).expect("own namespace");
        let (inside, links) = run_in_new(|| {
            let ino = inode(Path::new("/proc/thread-self/ns/net")).expect("worker namespace");
            let names: Vec<String> = crate::kernel::link::Links::current()
                .and_then(|mut l| l.list())
                .expect("list")
                .into_iter()
                .map(|l| l.name)
                .collect();
            (ino, names)
        })
        .expect("unshare works as root");
        assert_ne!(own, inside);
        assert_eq!(links, ["lo"]);
    }

    #[test]
    fn a_persistent_namespace_is_made_once_and_removed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("buses/a");
        assert!(create_persistent(&path).expect("create"));
        assert!(!create_persistent(&path).expect("reuse"));
        let own = inode(Path::new("/proc/thread-self/ns/net")).expect("own namespace");
        let inside = run(&Netns::Path(path.clone()), || {
            inode(Path::new("/proc/thread-self/ns/net")).expect("worker namespace")
        })
        .expect("enter");
        assert_ne!(own, inside);
        assert!(remove_persistent(&path).expect("remove"));
        assert!(!path.exists());
        assert!(!remove_persistent(&path).expect("already gone"));
    }

    #[test]
    fn the_callers_namespace_is_unchanged() {
        let before = inode(Path::new("/proc/thread-self/ns/net")).expect("own namespace");
        let inside = run(&Netns::Pid(std::process::id()), || {
            inode(Path::new("/proc/thread-self/ns/net")).expect("worker namespace")
        })
        .expect("entering our own namespace works");
        assert_eq!(before, inside);
        assert_eq!(
            before,
            inode(Path::new("/proc/thread-self/ns/net")).expect("own namespace")
        );
    }
}
