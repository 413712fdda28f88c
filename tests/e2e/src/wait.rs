//! Waiting on what the system under test exposes (metrics, logs, kernel state), never on fixed
//! sleeps: a condition is polled until it holds, and a test fails with what was still wrong.

use std::time::{Duration, Instant};

/// How often a condition is checked again.
const POLL: Duration = Duration::from_millis(200);

/// Polls `check` until it returns a value; panics with `what` and its last complaint after
/// `timeout`.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let started = Instant::now();
    loop {
        match check() {
            Ok(v) => return v,
            Err(why) if started.elapsed() >= timeout => {
                panic!("{what}: still not so after {timeout:?}:\n{why}")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// Polls `check` until it holds; panics with `what` after `timeout`.
pub async fn until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    eventually(what, timeout, || {
        if check() { Ok(()) } else { Err(String::new()) }
    })
    .await
}
