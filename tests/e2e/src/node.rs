//! A node: the kubelet stand-in and containerd's CRI, driven in the kubelet's order for each pod:
//! admission (Allocate) → RunPodSandbox → per container PreStartContainer → CreateContainer →
//! StartContainer; StopPodSandbox/RemovePodSandbox on delete.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::cri::{Cri, PodSpec};
use vcan_test_support::kubelet::{Kubelet, PodAllocation};

/// A pod that was started (possibly with containers that failed to start).
#[derive(Debug, Clone)]
pub struct StartedPod {
    /// The spec it was started from.
    pub spec: PodSpec,
    /// The runtime's sandbox ID.
    pub sandbox: String,
    /// Container name → runtime ID, for the containers that were started.
    pub containers: HashMap<String, String>,
    /// The devices the kubelet allocated.
    pub allocation: PodAllocation,
    /// The first container start failure, as the kubelet would report it in the pod's events.
    pub failure: Option<String>,
    /// Time spent in PreStartContainer calls.
    pub prestart: Duration,
}

impl StartedPod {
    /// The runtime ID of container `name`; panics if it was not started.
    pub fn container(&self, name: &str) -> &str {
        self.containers
            .get(name)
            .unwrap_or_else(|| panic!("container {name} of {} was not started", self.spec.name))
    }
}

/// The kubelet stand-in plus the runtime.
pub struct Node {
    /// The kubelet stand-in.
    pub kubelet: Kubelet,
    /// containerd's CRI service.
    pub cri: Cri,
    /// The resource pods request with `ContainerSpec::vcan`.
    pub resource: String,
}

impl Node {
    /// Admits and starts `spec` the way the kubelet does.
    pub async fn run_pod(&self, spec: &PodSpec) -> Result<StartedPod> {
        let requests: Vec<(String, String, usize)> = spec
            .containers
            .iter()
            .flat_map(|c| {
                std::iter::once((c.name.clone(), self.resource.clone(), c.vcan as usize)).chain(
                    c.resources
                        .iter()
                        .map(|(r, n)| (c.name.clone(), r.clone(), *n as usize)),
                )
            })
            .collect();
        let allocation = self
            .kubelet
            .admit(&spec.namespace, &spec.name, &requests)
            .await
            .with_context(|| format!("admitting pod {}/{}", spec.namespace, spec.name))?;
        let sandbox = self
            .cri
            .run_sandbox(spec)
            .await
            .with_context(|| format!("RunPodSandbox for {}/{}", spec.namespace, spec.name))?;
        // The kubelet reads the new sandbox's status (for the pod's IP) before starting
        // containers, and makes sure each container's image is there before its
        // PreStartContainer; the plugin sees PreStart after these calls, as it would in a cluster.
        self.cri
            .sandbox_status(&sandbox)
            .await
            .with_context(|| format!("PodSandboxStatus for {}/{}", spec.namespace, spec.name))?;
        let mut started = StartedPod {
            spec: spec.clone(),
            sandbox,
            containers: HashMap::new(),
            allocation,
            failure: None,
            prestart: Duration::ZERO,
        };
        for container in &spec.containers {
            // One PreStartContainer per resource the container holds, as the kubelet's device
            // manager calls each plugin in turn.
            let allocations: Vec<_> = started
                .allocation
                .containers
                .iter()
                .filter(|a| a.container == container.name)
                .cloned()
                .collect();
            self.cri
                .image_id(&container.image)
                .await
                .with_context(|| format!("ImageStatus for container {}", container.name))?;
            let mut envs = HashMap::new();
            for devices in allocations {
                let t = Instant::now();
                let result = self.kubelet.prestart(&devices).await;
                started.prestart += t.elapsed();
                if let Err(status) = result {
                    started.failure = Some(format!(
                        "CreateContainerConfigError: container {}: PreStartContainer: {}",
                        container.name,
                        status.message()
                    ));
                    return Ok(started);
                }
                envs.extend(devices.envs);
            }
            let id = self
                .cri
                .create_and_start(&started.sandbox, spec, container, &envs)
                .await
                .with_context(|| format!("starting container {}", container.name))?;
            started.containers.insert(container.name.clone(), id);
        }
        Ok(started)
    }

    /// Deletes a pod: removes its sandbox (and containers) and its allocation.
    pub async fn delete_pod(&self, pod: &StartedPod) -> Result<()> {
        self.cri.remove_pod(&pod.sandbox).await?;
        self.kubelet.forget(&pod.spec.namespace, &pod.spec.name);
        Ok(())
    }

    /// Runs `cansend IFNAME FRAME` in `pod`'s container `app`; panics with the output unless it
    /// succeeds within `timeout`.
    pub async fn cansend(&self, pod: &StartedPod, ifname: &str, frame: &str, timeout: Duration) {
        let out = self
            .cri
            .exec(pod.container("app"), &["cansend", ifname, frame], timeout)
            .await
            .unwrap_or_else(|e| panic!("exec in {}: {e:#}", pod.spec.name));
        assert_eq!(
            out.exit_code, 0,
            "cansend {frame} in {}: {}{}",
            pod.spec.name, out.stdout, out.stderr
        );
    }

    /// The frames a listener pod's container `app` dumped with `candump -L` (timestamps cut),
    /// once it has exited; panics unless it exited 0 within `timeout`.
    pub async fn dumped(&self, pod: &StartedPod, timeout: Duration) -> Vec<String> {
        let code = self
            .cri
            .wait_exit(pod.container("app"), timeout)
            .await
            .unwrap_or_else(|e| panic!("{}: {e:#}", pod.spec.name));
        let log = self.cri.logs(&pod.spec, "app").await.expect("logs");
        let frames: Vec<String> = log
            .lines()
            .filter_map(|l| l.split_once(' ').map(|(_, rest)| rest.to_string()))
            .collect();
        assert_eq!(code, 0, "{} missed frames; got {frames:?}", pod.spec.name);
        frames
    }
}
