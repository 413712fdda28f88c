//! A CAN-over-UDP tunnel compatible with cannelloni, for buses that span nodes: one tunnel end
//! per shared bus, talking to the plugin's instances on other nodes and to external peers (a bench
//! rig running cannelloni).
//!
//! [`wire`] is cannelloni's packet format (version 2) and the kernel's CAN frame layouts;
//! [`sequence`] accounts for a peer's packets from their sequence numbers — neither touches a
//! socket, so both are tested on the host, as is [`reorder`], which puts a peer's packets back in
//! order. [`auth`] authenticates the instances' packets, [`peers`] finds the peers, [`endpoint`]
//! runs a bus's tunnel end.

pub mod auth;
pub mod endpoint;
pub mod peers;
pub mod reorder;
pub mod sequence;
pub mod wire;
