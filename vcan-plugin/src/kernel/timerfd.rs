//! A one-shot timer with the kernel's resolution, for waits shorter than tokio's timer can
//! express: tokio rounds every deadline up to its next millisecond tick, which turns a 1 ms
//! batch into up to 2 ms.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;

/// A `timerfd` on the monotonic clock (the clock of [`Instant`]), read through the runtime's
/// reactor.
#[derive(Debug)]
pub struct PreciseTimer {
    fd: AsyncFd<OwnedFd>,
    armed: Option<Instant>,
}

impl PreciseTimer {
    /// A disarmed timer; needs a tokio runtime with I/O enabled.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked and owned below.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the timer owns `fd` and the registration, so the descriptor stays open for as
        // long as the reactor knows it.
        let fd = unsafe { AsyncFd::register(fd) }?;
        Ok(PreciseTimer { fd, armed: None })
    }

    /// Fires at `at` (at once if it has passed), or never with `None`; re-arming for the same
    /// instant costs nothing.
    pub fn set(&mut self, at: Option<Instant>) -> io::Result<()> {
        if at == self.armed {
            return Ok(());
        }
        let value = match at {
            // A zero value disarms, so an instant that has passed becomes the smallest delay.
            Some(at) => at
                .saturating_duration_since(Instant::now())
                .max(Duration::from_nanos(1)),
            None => Duration::ZERO,
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: value.as_secs() as libc::time_t,
                tv_nsec: value.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: a valid timerfd and a valid itimerspec; the old value is not asked for.
        let rc =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed = at;
        Ok(())
    }

    /// Waits until the armed instant; pending forever while disarmed.
    pub async fn expired(&mut self) -> io::Result<()> {
        if self.armed.is_none() {
            return std::future::pending().await;
        }
        loop {
            let mut guard = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            // SAFETY: reads 8 bytes into a buffer of 8.
            let n = unsafe {
                libc::read(
                    guard.get_inner().as_raw_fd(),
                    expirations.as_mut_ptr().cast(),
                    expirations.len(),
                )
            };
            if n == 8 {
                self.armed = None;
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                guard.clear_ready();
                continue;
            }
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fires_at_the_instant_to_the_sub_millisecond() {
        let mut timer = PreciseTimer::new().expect("timerfd");
        let start = Instant::now();
        timer
            .set(Some(start + Duration::from_micros(300)))
            .expect("arm");
        timer.expired().await.expect("expires");
        let took = start.elapsed();
        assert!(took >= Duration::from_micros(300), "{took:?}");
        // A passed instant fires at once; disarmed never.
        timer.set(Some(start)).expect("arm");
        timer.expired().await.expect("expires");
        timer.set(None).expect("disarm");
        assert!(
            tokio::time::timeout(Duration::from_millis(20), timer.expired())
                .await
                .is_err()
        );
    }
}
