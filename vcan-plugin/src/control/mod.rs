//! Fault injection on timed buses (buses the plugin schedules in userspace), for test
//! pipelines: make a bus misbehave for one member pod or for all of them — bus-off, disconnect,
//! dropped, corrupted or delayed frames — for a while.
//!
//! # Why a Unix socket and `kubectl exec`
//!
//! Faults break the buses of running workloads, so asking for one must not be reachable over
//! the network: the metrics port is open to anyone in the cluster, and adding authentication
//! to it would mean keys to distribute and rotate. Instead the daemon serves a Unix socket in
//! its state directory, `<state-dir>/control.sock`, mode 0600, and the same binary is its
//! client, so a pipeline runs
//!
//! ```text
//! kubectl exec -n <ns> <plugin-pod> -- vcan-plugin fault inject --bus chassis \
//!     --pod default/ecu-a --kind bus-off --restart-ms 200
//! ```
//!
//! and Kubernetes RBAC on `pods/exec` in the plugin's namespace decides who may: the cluster's
//! existing access control, audited by the API server. The plugin pod to exec into is the one
//! on the node whose bus is meant (each instance schedules its own node's timed buses). On the
//! host the socket is reachable only by root, like the buses' namespaces next to it.
//!
//! # Protocol
//!
//! One JSON object per line each way: the client sends a [`Request`], the daemon answers with
//! one [`Reply`]; a connection may carry several requests. Durations are integer milliseconds
//! in fields ending `_ms`. Requests:
//!
//! ```text
//! {"op":"inject","bus":"chassis","target":{"pod":{"namespace":"default","name":"ecu-a"}},
//!  "kind":{"type":"bus_off","restart_ms":200}}
//! {"op":"inject","bus":"chassis","target":"all","kind":{"type":"disconnect","duration_ms":500}}
//!   kind may also be {"type":"drop","probability":0.1,"duration_ms":5000},
//!   {"type":"corrupt","probability":0.01,"duration_ms":5000} or
//!   {"type":"delay","latency_ms":20,"jitter_ms":5,"duration_ms":5000} (jitter_ms defaults to 0)
//! {"op":"clear","bus":"chassis"}                    every fault on the bus
//! {"op":"clear","bus":"chassis","target":"all"}     only those injected for all members
//! {"op":"list"}  or  {"op":"list","bus":"chassis"}
//! ```
//!
//! Replies:
//!
//! ```text
//! {"status":"ok","message":"...","faults":[{"bus":"chassis","target":"all",
//!  "kind":{"type":"drop","probability":0.1,"duration_ms":5000},"remaining_ms":4200}]}
//! {"status":"error","message":"what is wrong and what to do"}
//! ```
//!
//! Unknown fields are refused, not ignored: a misspelt `target` in a clear would otherwise
//! clear every fault on the bus. Requests are validated ([`Request::validate`]) before the
//! daemon's [`Handler`] sees them. A line over [`socket::MAX_REQUEST_LINE`] bytes or that is not
//! a valid request gets an error reply; a connection idle for [`socket::IDLE_TIMEOUT`] is
//! closed; at most [`socket::MAX_CONNECTIONS`] are served at once.

pub mod request;
pub mod socket;

pub use request::{
    ActiveFault, FaultKind, FaultParams, Inject, Reply, Request, RequestError, Target,
};
pub use socket::{ControlError, Handler, request, serve};

/// The control socket's file name in the state directory.
pub const SOCKET_NAME: &str = "control.sock";
