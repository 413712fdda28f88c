//! A socketcand endpoint per bus: engineers' tools (python-can's `socketcand` interface, Kayak)
//! see and send on a cluster bus over TCP as on a local interface.
//!
//! [`protocol`] is socketcand's ASCII protocol (linux-can/socketcand `doc/protocol.md`), tested on
//! the host; [`server`] serves it for one bus through the bus's `socketcand` end, a vxcan pair
//! joined by can-gw like a member's, so forwarding among pods stays in the kernel.

pub mod protocol;
pub mod server;
