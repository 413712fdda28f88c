//! The pure parts of a CAN-over-UDP tunnel compatible with cannelloni, for buses that span
//! nodes: one tunnel end per shared bus and peer, a plugin instance on another node or a bench
//! rig running cannelloni.
//!
//! [`wire`] is cannelloni's packet format (version 2) and the kernel's CAN frame layouts;
//! [`sequence`] accounts for a peer's packets from their sequence numbers. Neither touches a
//! socket, so both are tested on the host.

pub mod sequence;
pub mod wire;
