//! vcan-plugin: a Kubernetes device plugin that gives pods virtual SocketCAN interfaces.
//!
//! The modules follow the data: the kubelet calls the device-plugin API ([`kubelet`]); a
//! [`serve::ResourceServer`] per resource finds the pod holding the allocated devices and its
//! sandbox ([`pod`]) and has its [`serve::Provision`] make the pod's interfaces — private vcans or
//! membership of a shared [`bus`] — with the [`kernel`]'s interfaces before the pod's containers start; [`ebpf`] counts their frames and
//! [`telemetry`] reports. Physical controllers are lent by [`hardware`]; buses that span nodes
//! carry frames between the plugin's instances through a [`tunnel`]. [`daemon`] wires it
//! together, [`node`] is the state scrapes read.

#![deny(missing_docs)]

pub mod api;
pub mod bus;
pub mod config;
pub mod control;
pub mod daemon;
pub mod ebpf;
pub mod hardware;
pub mod kernel;
pub mod kubelet;
pub mod node;
pub mod pod;
pub mod resource;
pub mod serve;
pub mod socketcand;
pub mod telemetry;
pub mod tunnel;
pub mod uds;
