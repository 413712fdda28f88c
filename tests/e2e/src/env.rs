//! A whole node in the test-bed: containerd, the kubelet stand-in and the vcan-plugin daemon,
//! wired together the way a cluster node runs them.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::containerd::{Containerd, ContainerdOptions};
use crate::cri::Cri;
use crate::node::Node;
use crate::plugin::{Plugin, PluginConfig};
use vcan_test_support::kubelet::Kubelet;

/// The resource the test node serves.
pub const RESOURCE: &str = "socketcan.io/vcan";

/// A running node; everything stops when it is dropped.
pub struct TestNode {
    /// Kubelet stand-in and CRI.
    pub node: Node,
    /// The plugin daemon.
    pub plugin: Plugin,
    /// containerd.
    pub containerd: Containerd,
    /// Where the node's files live.
    pub root: PathBuf,
}

impl TestNode {
    /// Starts containerd, the kubelet stand-in and the plugin (with `devices` devices and metrics
    /// on `metrics_address`), and waits until the plugin has registered with healthy devices.
    pub async fn start(devices: u32, metrics_address: &str) -> Result<Self> {
        Self::start_with(devices, metrics_address, Vec::new(), &[]).await
    }

    /// Like [`TestNode::start`], with further plugin arguments, and also waiting for each of
    /// `resources` (name, devices) to be registered with healthy devices.
    pub async fn start_with(
        devices: u32,
        metrics_address: &str,
        extra_args: Vec<String>,
        resources: &[(&str, usize)],
    ) -> Result<Self> {
        let root = PathBuf::from("/run/vcan-node");
        std::fs::create_dir_all(&root)?;
        let containerd = Containerd::start(ContainerdOptions::default())
            .await
            .context("starting containerd")?;
        let cri = Cri::connect(containerd.socket()).await?;
        let device_plugin_dir = root.join("device-plugins");
        let pod_resources_socket = root.join("pod-resources/kubelet.sock");
        let kubelet = Kubelet::start(&device_plugin_dir, &pod_resources_socket).await?;
        let plugin = Plugin::start(&PluginConfig {
            device_plugin_dir,
            pod_resources_socket,
            containerd_socket: containerd.socket().to_path_buf(),
            metrics_address: metrics_address.to_string(),
            resource_name: RESOURCE.to_string(),
            devices,
            log: root.join("vcan-plugin.log"),
            extra_args,
            netns: None,
        })?;
        let node = Node {
            kubelet,
            cri,
            resource: RESOURCE.to_string(),
        };
        let test_node = TestNode {
            node,
            plugin,
            containerd,
            root,
        };
        test_node
            .node
            .kubelet
            .wait_for_resource(RESOURCE, devices as usize, Duration::from_secs(30))
            .await
            .with_context(|| format!("plugin log:\n{}", test_node.plugin.log()))?;
        for (resource, count) in resources {
            test_node
                .node
                .kubelet
                .wait_for_resource(resource, *count, Duration::from_secs(30))
                .await
                .with_context(|| format!("plugin log:\n{}", test_node.plugin.log()))?;
        }
        Ok(test_node)
    }
}

impl TestNode {
    /// The name (under /run/netns) of the network namespace of sandbox `sandbox`; panics if the
    /// runtime does not say or the pod has none of its own.
    pub async fn netns_of_sandbox(&self, sandbox: &str) -> String {
        self.node
            .cri
            .netns_path(sandbox)
            .await
            .expect("sandbox status")
            .expect("the pod has its own network namespace")
            .file_name()
            .expect("netns file name")
            .to_string_lossy()
            .into_owned()
    }

    /// The name of `pod`'s network namespace (see [`TestNode::netns_of_sandbox`]).
    pub async fn netns_name(&self, pod: &crate::node::StartedPod) -> String {
        self.netns_of_sandbox(&pod.sandbox).await
    }

    /// Runs `spec` the way the kubelet does and panics, with the plugin's log, unless every
    /// container started.
    pub async fn run_pod_ok(&self, spec: &crate::PodSpec) -> crate::node::StartedPod {
        let started = self.node.run_pod(spec).await.unwrap_or_else(|e| {
            panic!(
                "{}/{}: {e:#}\nplugin log:\n{}",
                spec.namespace,
                spec.name,
                self.plugin.log()
            )
        });
        assert_eq!(
            started.failure,
            None,
            "{}/{}\nplugin log:\n{}",
            spec.namespace,
            spec.name,
            self.plugin.log()
        );
        started
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        // The guest's /run is lost with the VM: keep the plugin's log with the run's results.
        if let Some(dir) = std::env::var_os("VMTEST_RESULTS") {
            let name = format!(
                "vcan-plugin-{}.log",
                std::env::args()
                    .next()
                    .and_then(|a| std::path::Path::new(&a)
                        .file_name()
                        .map(|f| f.to_string_lossy().into_owned()))
                    .unwrap_or_default()
            );
            let _ = std::fs::write(PathBuf::from(dir).join(name), self.plugin.log());
        }
    }
}
