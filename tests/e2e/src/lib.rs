//! End-to-end harness for vcan-plugin: a real containerd with its CRI service, driven the way
//! the kubelet drives it, in the CAN test-bed VM.
//!
//! - [`cluster`]: two nodes in one VM (a bridge with a namespace per node, netem, dnsmasq for
//!   the peer service, a plugin instance per node) for buses that span nodes;
//! - [`containerd`]: starts containerd (CRI plugin, runc, a bridge CNI network, the locally
//!   built images) inside the guest, restarts it, and cleans up after it;
//! - [`cri`]: a small CRI client that runs pods and containers with the requests the kubelet
//!   sends, reads their logs, execs in them and finds their network namespaces;
//! - [`images`]: where the images built by `cargo xtask images` are, and their names;
//! - [`node`]: the kubelet stand-in (`vcan_test_support::kubelet`, shared with the plugin's host
//!   tests) and the runtime, driven in the kubelet's order for each pod;
//! - [`plugin`]: the vcan-plugin daemon as a child process;
//! - [`prometheus`]: a real Prometheus scraping plugin instances, and the Grafana dashboard's
//!   panel queries, to check that the panels draw;
//! - [`env`]: a whole node (containerd, kubelet stand-in, plugin) for tests, demo and benchmark;
//! - [`wait`]: polling a condition until it holds, instead of sleeping.
//!
//! Everything here needs root and containerd, runc, the CNI plugins and the image tars, which
//! the test-bed VM (`cargo xtask vm-test`) provides; tests using it are
//! `#[ignore = "needs the CAN test-bed VM"]` and call `vcan_test_support::require_testbed()`.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use vcan_e2e::{ContainerSpec, Containerd, ContainerdOptions, Cri, PodSpec, images};
//!
//! let containerd = Containerd::start(ContainerdOptions::default()).await?;
//! let cri = Cri::connect(containerd.socket()).await?;
//! let mut pod = PodSpec::new("default", "demo");
//! pod.containers.push(ContainerSpec::new(
//!     "main",
//!     images::CANUTILS_IMAGE,
//!     ["sh", "-c", "echo hello"],
//! ));
//! let sandbox = cri.run_sandbox(&pod).await?;
//! let id = cri
//!     .create_and_start(&sandbox, &pod, &pod.containers[0], &Default::default())
//!     .await?;
//! assert_eq!(cri.wait_exit(&id, std::time::Duration::from_secs(60)).await?, 0);
//! assert_eq!(cri.logs(&pod, "main").await?, "hello\n");
//! cri.remove_pod(&sandbox).await?;
//! containerd.stop().await?;
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

pub mod cluster;
pub mod containerd;
pub mod cri;
pub mod env;
pub mod images;
pub mod node;
pub mod plugin;
pub mod prometheus;
pub mod wait;

pub use containerd::{Containerd, ContainerdOptions, Startup};
pub use cri::{ContainerSpec, Cri, ExecOutput, PodSpec};
