//! Socket buffer sizes: how much a socket holds while its reader waits for a CPU, or how much a
//! slow peer can hold up.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Which buffer of a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffer {
    /// What arrived and was not read yet.
    Receive,
    /// What was written and not sent (or acknowledged) yet.
    Send,
}

/// Sets `buffer` of the socket `fd` to `bytes`. Beyond the node's `net.core.rmem_max` /
/// `wmem_max` only with CAP_NET_ADMIN (the `*FORCE` options, which the plugin has); without it
/// the kernel's limit applies.
pub fn set(fd: BorrowedFd<'_>, buffer: Buffer, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let (force, plain) = match buffer {
        Buffer::Receive => (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        Buffer::Send => (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    };
    let set = |option| {
        // SAFETY: the option value points at a c_int of the length given; the descriptor is
        // borrowed, so open for the call.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    set(force).or_else(|_| set(plain))
}
