//! The kubelet's device-plugin API: the service the kubelet calls and the registration with it.

pub mod plugin;
pub mod registration;
