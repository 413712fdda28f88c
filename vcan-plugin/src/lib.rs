//! vcan-plugin: a Kubernetes device plugin that gives pods virtual SocketCAN (`vcan`) interfaces.
//!
//! The modules follow the data: the kubelet calls the device-plugin API ([`kubelet`]); the
//! [`injector`] finds the pod holding the allocated devices ([`podresources`]) and its sandbox's
//! network namespace ([`runtime`]), reads its annotations ([`pod_config`]) and creates the pod's
//! interfaces there ([`link`], inside the namespace via [`netns`]) before the pod's containers start.

#![deny(missing_docs)]

pub mod api;
pub mod bus;
pub mod cangw;
pub mod config;
pub mod ebpf;
pub mod health;
pub mod injector;
pub mod kubelet;
pub mod link;
pub mod metrics;
pub mod netlink;
pub mod netns;
pub mod pod_config;
pub mod podresources;
pub mod resource;
pub mod runtime;
pub mod uds;
pub mod vxcan;
