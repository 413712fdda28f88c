//! Answers the control socket's fault requests with the node's timed buses.

use std::sync::Arc;

use crate::bus::Bus;
use crate::control::request::{Inject, Reply, Request};
use crate::control::socket::Handler;

/// The node's buses, as the control socket sees them.
#[derive(Debug)]
pub struct BusFaults {
    buses: Vec<Arc<Bus>>,
}

impl BusFaults {
    /// Faults on `buses`.
    pub fn new(buses: Vec<Arc<Bus>>) -> Self {
        BusFaults { buses }
    }

    /// The timed bus `name`, or the reply saying why there is none.
    fn timed(&self, name: &str) -> Result<&Arc<crate::bus::timing::TimedBus>, Reply> {
        let Some(bus) = self.buses.iter().find(|b| b.spec().name == name) else {
            let names: Vec<&str> = self.buses.iter().map(|b| b.spec().name.as_str()).collect();
            return Err(Reply::error(format!(
                "no bus {name:?} on this node (buses: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )));
        };
        bus.timed().ok_or_else(|| {
            Reply::error(format!(
                "bus {name} forwards frames in the kernel, where faults cannot be injected: give \
                 it a \"bitrate\" in the bus configuration (with \"pace\": false it keeps memory \
                 speed)"
            ))
        })
    }
}

impl Handler for BusFaults {
    fn handle(&self, request: Request) -> Reply {
        match request {
            Request::Inject(Inject { bus, target, kind }) => {
                let timed = match self.timed(&bus) {
                    Ok(t) => t,
                    Err(reply) => return reply,
                };
                match timed.inject(&target, &kind) {
                    Ok(members) => {
                        let names: Vec<String> = members.iter().map(|p| p.to_string()).collect();
                        tracing::info!(bus, kind = kind.label(), members = %names.join(","), "fault injected");
                        Reply::Ok {
                            message: format!("{} on bus {bus} for {}", kind, names.join(", ")),
                            faults: timed.faults(),
                        }
                    }
                    Err(message) => Reply::Error { message },
                }
            }
            Request::Clear { bus, target } => {
                let timed = match self.timed(&bus) {
                    Ok(t) => t,
                    Err(reply) => return reply,
                };
                let n = timed.clear(target.as_ref());
                tracing::info!(bus, cleared = n, "faults cleared");
                Reply::Ok {
                    message: format!("{n} fault(s) ended on bus {bus}"),
                    faults: timed.faults(),
                }
            }
            Request::List { bus } => {
                let mut faults = Vec::new();
                for b in &self.buses {
                    if bus.as_ref().is_some_and(|name| *name != b.spec().name) {
                        continue;
                    }
                    if let Some(t) = b.timed() {
                        faults.extend(t.faults());
                    }
                }
                if let Some(name) = &bus
                    && let Err(reply) = self.timed(name)
                {
                    return reply;
                }
                Reply::Ok {
                    message: format!("{} active fault(s)", faults.len()),
                    faults,
                }
            }
        }
    }
}
