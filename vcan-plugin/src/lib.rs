//! vcan-plugin: a Kubernetes device plugin that gives pods virtual SocketCAN (`vcan`) interfaces.
//!
//! The modules follow the data: the kubelet calls the device-plugin API, the plugin finds the pod
//! that owns the allocated devices and its network namespace, and creates the pod's interfaces there
//! before the pod's containers start.

#![deny(missing_docs)]

pub mod api;
pub mod link;
pub mod netlink;
pub mod netns;
