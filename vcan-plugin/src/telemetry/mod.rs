//! What the plugin tells the outside: Prometheus metrics, the HTTP endpoint serving them with the
//! probes, and the node's ability to serve its resources (device health).

pub mod bus_load;
pub mod health;
pub mod http;
pub mod metrics;
