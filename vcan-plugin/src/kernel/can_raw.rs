//! CAN_RAW sockets bound to one interface of a namespace: how frames leave the kernel's CAN
//! plumbing for user space (a bus tunnel) and come back.
//!
//! A socket keeps the namespace it was opened in, so it is opened on a thread inside the
//! namespace ([`netns::run`]) and then used from the async runtime like any other socket.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::unix::AsyncFd;

use crate::kernel::netns::{self, Netns, NetnsError};

/// `CAN_RAW` protocol of `PF_CAN`.
const CAN_RAW: libc::c_int = 1;
/// `SOL_CAN_BASE + CAN_RAW`.
const SOL_CAN_RAW: libc::c_int = 101;
/// `CAN_RAW_FD_FRAMES`: also pass CAN FD frames (72 bytes).
const CAN_RAW_FD_FRAMES: libc::c_int = 5;
/// `CAN_RAW_ERR_FILTER`: which error frames to receive.
const CAN_RAW_ERR_FILTER: libc::c_int = 2;
/// `CAN_RAW_LOOPBACK`: whether frames sent are looped back to the namespace's other sockets.
const CAN_RAW_LOOPBACK: libc::c_int = 3;
/// `CAN_ERR_MASK`: every class of error frame.
const CAN_ERR_MASK: u32 = 0x1FFF_FFFF;
pub use crate::kernel::frame::{CAN_MTU, CANFD_MTU};

/// A CAN socket's receive buffer: about a thousand frames (each takes ~1 KiB of buffer).
const RECEIVE_BUFFER: usize = 1 << 20;

/// `struct sockaddr_can` up to the interface index (the address union is unused for CAN_RAW).
#[repr(C)]
struct SockaddrCan {
    family: libc::sa_family_t,
    ifindex: libc::c_int,
    addr: [u8; 16],
}

/// Why a CAN socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum CanRawError {
    /// The namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The interface does not exist in the namespace.
    #[error("no interface {ifname} in network namespace {ns}")]
    NoInterface {
        /// The interface.
        ifname: String,
        /// The namespace.
        ns: String,
    },
    /// A socket call failed.
    #[error("CAN_RAW socket on {ifname} in {ns}: {call}: {source}")]
    Socket {
        /// The interface.
        ifname: String,
        /// The namespace.
        ns: String,
        /// The call that failed.
        call: &'static str,
        /// The error.
        source: io::Error,
    },
}

/// A non-blocking CAN_RAW socket bound to one interface, receiving classic and FD frames.
#[derive(Debug)]
pub struct RawCanSocket {
    fd: OwnedFd,
}

impl RawCanSocket {
    /// Opens a socket on `ifname` in `ns` (blocking: enters the namespace on a thread).
    pub fn open(ns: &Netns, ifname: &str) -> Result<Self, CanRawError> {
        let name = ifname.to_string();
        let where_ = ns.to_string();
        netns::run(ns, move || Self::open_here(&name, &where_))?
    }

    /// Opens a socket on every CAN interface of `ns` (blocking): it reads each frame with the
    /// interface it arrived on ([`RawCanSocket::recv_from`]) and sends out of any interface
    /// ([`RawCanSocket::send_to`]). It also receives error frames, and what it sends is not looped
    /// back to the namespace's other sockets (a timed bus's scheduler is the namespace's only
    /// reader).
    pub fn open_every_interface(ns: &Netns) -> Result<Self, CanRawError> {
        let where_ = ns.to_string();
        netns::run(ns, move || {
            let socket = Self::open_here("", &where_)?;
            let fail = |call| CanRawError::Socket {
                ifname: "*".into(),
                ns: where_.clone(),
                call,
                source: io::Error::last_os_error(),
            };
            socket
                .set_option(CAN_RAW_ERR_FILTER, CAN_ERR_MASK as libc::c_int)
                .map_err(|_| fail("setsockopt(CAN_RAW_ERR_FILTER)"))?;
            socket
                .set_option(CAN_RAW_LOOPBACK, 0)
                .map_err(|_| fail("setsockopt(CAN_RAW_LOOPBACK)"))?;
            Ok(socket)
        })?
    }

    fn set_option(&self, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
        // SAFETY: the option value points at a c_int of the length given.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                SOL_CAN_RAW,
                option,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one frame into `buf` (at least [`CANFD_MTU`] bytes): its size and the index of the
    /// interface it arrived on. `WouldBlock` when none is waiting.
    pub fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, u32)> {
        let mut addr = SockaddrCan {
            family: 0,
            ifindex: 0,
            addr: [0; 16],
        };
        let mut len = std::mem::size_of::<SockaddrCan>() as libc::socklen_t;
        // SAFETY: buf is writable for its length, addr for len bytes.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                (&mut addr as *mut SockaddrCan).cast(),
                &mut len,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((n as usize, addr.ifindex as u32))
    }

    /// Sends one frame ([`CAN_MTU`] or [`CANFD_MTU`] bytes) out of interface `ifindex`.
    pub fn send_to(&self, frame: &[u8], ifindex: u32) -> io::Result<()> {
        let addr = SockaddrCan {
            family: libc::AF_CAN as libc::sa_family_t,
            ifindex: ifindex as libc::c_int,
            addr: [0; 16],
        };
        // SAFETY: frame is readable for its length, addr is a sockaddr_can of the size given.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
                (&addr as *const SockaddrCan).cast(),
                std::mem::size_of::<SockaddrCan>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Opens a socket bound to `ifname`, or to every interface for `""`.
    fn open_here(ifname: &str, ns: &str) -> Result<Self, CanRawError> {
        let fail = |call| CanRawError::Socket {
            ifname: ifname.to_string(),
            ns: ns.to_string(),
            call,
            source: io::Error::last_os_error(),
        };
        let c_name = CString::new(ifname).map_err(|_| CanRawError::NoInterface {
            ifname: ifname.to_string(),
            ns: ns.to_string(),
        })?;
        let ifindex = if ifname.is_empty() {
            0
        } else {
            // SAFETY: c_name is a valid NUL-terminated string.
            unsafe { libc::if_nametoindex(c_name.as_ptr()) }
        };
        if ifindex == 0 && !ifname.is_empty() {
            return Err(CanRawError::NoInterface {
                ifname: ifname.to_string(),
                ns: ns.to_string(),
            });
        }
        // SAFETY: plain socket(2); the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_CAN,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                CAN_RAW,
            )
        };
        if raw < 0 {
            return Err(fail("socket"));
        }
        // SAFETY: raw is a fresh descriptor owned by nobody else.
        let socket = RawCanSocket {
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
        };
        socket
            .set_option(CAN_RAW_FD_FRAMES, 1)
            .map_err(|_| fail("setsockopt(CAN_RAW_FD_FRAMES)"))?;
        let fd = socket.fd;
        // Frames wait here while the reader waits for a CPU; the default buffer holds about 200.
        {
            use std::os::fd::AsFd;
            if let Err(e) = crate::kernel::sockbuf::set(
                fd.as_fd(),
                crate::kernel::sockbuf::Buffer::Receive,
                RECEIVE_BUFFER,
            ) {
                tracing::debug!(ifname, error = %e, "cannot enlarge a CAN socket's receive buffer");
            }
        }
        let addr = SockaddrCan {
            family: libc::AF_CAN as libc::sa_family_t,
            ifindex: ifindex as libc::c_int,
            addr: [0; 16],
        };
        // SAFETY: addr is a sockaddr_can of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const SockaddrCan).cast(),
                std::mem::size_of::<SockaddrCan>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(fail("bind"));
        }
        Ok(RawCanSocket { fd })
    }

    /// Reads one frame into `buf` (at least [`CANFD_MTU`] bytes): returns its size, [`CAN_MTU`]
    /// or [`CANFD_MTU`]. `WouldBlock` when none is waiting.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame ([`CAN_MTU`] or [`CANFD_MTU`] bytes). `WouldBlock` when the interface's
    /// queue is full.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: frame is readable for its length.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != frame.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short CAN write: {n} of {} bytes", frame.len()),
            ));
        }
        Ok(())
    }
}

impl RawCanSocket {
    /// Opens a socket on `ifname` in `ns` (on a blocking thread) and registers it with the async
    /// runtime.
    pub async fn open_async(
        ns: &Netns,
        ifname: &str,
    ) -> Result<AsyncFd<RawCanSocket>, CanRawError> {
        let (ns, name) = (ns.clone(), ifname.to_string());
        let where_ = ns.to_string();
        let socket = tokio::task::spawn_blocking(move || RawCanSocket::open(&ns, &name))
            .await
            .map_err(|e| CanRawError::Netns(NetnsError::Thread(e.to_string())))??;
        // SAFETY: the socket owns its descriptor (an OwnedFd), never replaces it and keeps it open
        // until it is dropped with the AsyncFd.
        unsafe { AsyncFd::register(socket) }.map_err(|e| CanRawError::Socket {
            ifname: ifname.to_string(),
            ns: where_,
            call: "epoll registration",
            source: e.into_parts().1,
        })
    }
}

/// Reads the frames waiting on `can`, at most `max`, handing each to `each` as the kernel wrote
/// it (a `can_frame` or a `canfd_frame`); pending forever without a socket, so that a `select!`
/// can wait on a socket that is not open yet.
pub async fn read_waiting(
    can: Option<&AsyncFd<RawCanSocket>>,
    max: usize,
    mut each: impl FnMut(&[u8]),
) -> io::Result<()> {
    let Some(can) = can else {
        return std::future::pending().await;
    };
    let mut guard = can.readable().await?;
    let mut raw = [0u8; CANFD_MTU];
    for _ in 0..max {
        match guard.get_inner().recv(&mut raw) {
            Ok(n) => each(&raw[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                guard.clear_ready();
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl AsRawFd for RawCanSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
