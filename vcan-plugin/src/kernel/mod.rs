//! The kernel's CAN plumbing, over our own rtnetlink: namespaces ([`netns`]), netlink messages
//! with one set of constants ([`netlink`]), vcan links ([`link`]), vxcan pairs ([`vxcan`]),
//! can-gw rules ([`cangw`]), physical CAN controllers ([`can`]), CAN_RAW sockets ([`can_raw`])
//! the frame constants they all share ([`frame`]), traffic-control filters ([`tc`]), socket
//! buffer sizes ([`sockbuf`]) and a timer finer than tokio's ([`timerfd`]).

pub mod can;
pub mod can_raw;
pub mod cangw;
pub mod frame;
pub mod link;
pub mod netlink;
pub mod netns;
pub mod sockbuf;
pub mod tc;
pub mod timerfd;
pub mod vxcan;
