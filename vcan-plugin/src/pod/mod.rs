//! Pods as the plugin sees them: who holds which devices (the kubelet's PodResources), where a
//! pod's sandbox and network namespace are (the container runtime, followed through its events),
//! and what its annotations ask.

pub mod annotations;
pub mod container_record;
pub mod resources;
pub mod runtime;
pub mod runtime_events;
pub mod sandbox_index;

pub use resources::PodRef;
