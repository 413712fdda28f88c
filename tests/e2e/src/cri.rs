//! A CRI client that sets pods up the way the kubelet does.
//!
//! The requests follow the kubelet's `kuberuntime` (`generatePodSandboxConfig`,
//! `generateContainerConfig`) for a BestEffort pod: the same metadata, labels, log paths,
//! namespace modes and security defaults, so the runtime, and a device plugin looking at it, see
//! what they would see under a real kubelet. Containers may have hostPath-style mounts
//! ([`HostMount`]) and a security context ([`SecurityContext`]: capabilities, user, read-only
//! root, seccomp, AppArmor), translated as the kubelet translates a pod's. What a kubelet adds
//! around that (DNS config, `/etc/hosts` and termination-log mounts, cgroup parents) is left
//! out.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use tonic::transport::Channel;
use vcan_plugin::api::cri::v1::image_service_client::ImageServiceClient;
use vcan_plugin::api::cri::v1::runtime_service_client::RuntimeServiceClient;
use vcan_plugin::api::cri::v1::{
    Capability, ContainerConfig, ContainerMetadata, ContainerState, ContainerStatus,
    ContainerStatusRequest, CreateContainerRequest, ExecSyncRequest, ImageSpec, ImageStatusRequest,
    Int64Value, KeyValue, LinuxContainerConfig, LinuxContainerResources,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    ListPodSandboxRequest, Mount, MountPropagation, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata, PodSandboxStatus, PodSandboxStatusRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, SecurityProfile, StartContainerRequest,
    StatusRequest, StatusResponse, StopContainerRequest, StopPodSandboxRequest,
    security_profile::ProfileType,
};

/// Label keys the kubelet puts on sandboxes and containers.
pub mod labels {
    /// The pod's name.
    pub const POD_NAME: &str = "io.kubernetes.pod.name";
    /// The pod's namespace.
    pub const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
    /// The pod's UID.
    pub const POD_UID: &str = "io.kubernetes.pod.uid";
    /// The container's name (containers only).
    pub const CONTAINER_NAME: &str = "io.kubernetes.container.name";
}

/// Where the kubelet keeps pod logs.
pub const POD_LOGS_DIR: &str = "/var/log/pods";

/// PATH added to every container's environment unless the caller sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The kubelet's default masked paths for unprivileged containers
/// (`securitycontext.ConvertToRuntimeMaskedPaths`).
const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// The kubelet's default read-only paths for unprivileged containers.
const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// A pod as the tests describe it: the subset of a Kubernetes pod spec the kubelet turns into
/// CRI requests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodSpec {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Pod UID; [`PodSpec::new`] makes a unique one.
    pub uid: String,
    /// Pod annotations, passed to RunPodSandbox as they are.
    pub annotations: HashMap<String, String>,
    /// Pod labels; the `io.kubernetes.pod.*` labels are added.
    pub labels: HashMap<String, String>,
    /// `hostNetwork: true`: the sandbox gets the node's network namespace.
    pub host_network: bool,
    /// The pod's containers.
    pub containers: Vec<ContainerSpec>,
}

/// A container of a [`PodSpec`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerSpec {
    /// Container name, unique in the pod.
    pub name: String,
    /// Image reference, e.g. [`crate::images::CANUTILS_IMAGE`].
    pub image: String,
    /// Entrypoint override (Kubernetes `command`); empty keeps the image's.
    pub command: Vec<String>,
    /// Arguments (Kubernetes `args`).
    pub args: Vec<String>,
    /// Environment variables.
    pub env: HashMap<String, String>,
    /// vcan devices the container requests (resource limit); for the caller's kubelet
    /// stand-in, not used by [`Cri`].
    pub vcan: u32,
    /// Other extended resources the container requests (e.g. a shared bus), as (name, count);
    /// for the caller's kubelet stand-in, not used by [`Cri`].
    pub resources: Vec<(String, u32)>,
    /// Host directories mounted into the container (Kubernetes hostPath volumes and their
    /// `volumeMounts`), in order.
    pub mounts: Vec<HostMount>,
    /// The container's `securityContext`; the default is the kubelet's for a pod without one.
    pub security: SecurityContext,
}

/// Kubernetes `mountPropagation`, as CRI's `MountPropagation`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Propagation {
    /// `None` (the default): private, later host mounts stay invisible (`rprivate`).
    #[default]
    Private,
    /// `HostToContainer`: mounts made on the host later show up inside (`rslave`). containerd
    /// refuses it unless the host path is on a shared or slave mount.
    HostToContainer,
    /// `Bidirectional` (`rshared`): privileged containers only.
    Bidirectional,
}

impl Propagation {
    fn to_cri(self) -> MountPropagation {
        match self {
            Propagation::Private => MountPropagation::PropagationPrivate,
            Propagation::HostToContainer => MountPropagation::PropagationHostToContainer,
            Propagation::Bidirectional => MountPropagation::PropagationBidirectional,
        }
    }
}

/// A host directory (or file) mounted into a container: a hostPath volume with its
/// `volumeMount`, as the kubelet passes it in CRI's `Mount`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostMount {
    /// `mountPath`: where it appears in the container.
    pub container_path: PathBuf,
    /// The volume's `hostPath.path` (the runtime resolves symlinks in it).
    pub host_path: PathBuf,
    /// `readOnly`.
    pub readonly: bool,
    /// `mountPropagation`.
    pub propagation: Propagation,
}

impl HostMount {
    /// A read-write, private mount of `host_path` at `container_path`.
    pub fn new(host_path: impl Into<PathBuf>, container_path: impl Into<PathBuf>) -> Self {
        Self {
            container_path: container_path.into(),
            host_path: host_path.into(),
            readonly: false,
            propagation: Propagation::Private,
        }
    }

    /// The same mount, read-only.
    pub fn readonly(mut self) -> Self {
        self.readonly = true;
        self
    }

    /// The same mount with `propagation`.
    pub fn propagation(mut self, propagation: Propagation) -> Self {
        self.propagation = propagation;
        self
    }

    fn to_cri(&self) -> Mount {
        Mount {
            container_path: self.container_path.to_string_lossy().into_owned(),
            host_path: self.host_path.to_string_lossy().into_owned(),
            readonly: self.readonly,
            selinux_relabel: false,
            propagation: self.propagation.to_cri() as i32,
            ..Mount::default()
        }
    }
}

/// A seccomp or AppArmor profile choice (`seccompProfile.type`, `appArmorProfile.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// `Unconfined`.
    Unconfined,
    /// `RuntimeDefault`: the container runtime's default profile.
    RuntimeDefault,
}

impl Profile {
    fn to_cri(self) -> SecurityProfile {
        SecurityProfile {
            profile_type: match self {
                Profile::Unconfined => ProfileType::Unconfined,
                Profile::RuntimeDefault => ProfileType::RuntimeDefault,
            } as i32,
            localhost_ref: String::new(),
        }
    }
}

/// A container's Kubernetes `securityContext`, the fields the kubelet passes on to CRI's
/// `LinuxContainerSecurityContext`. The default is what the kubelet sends for a container
/// without one (and a kubelet without `seccompDefault`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecurityContext {
    /// `privileged`.
    pub privileged: bool,
    /// `capabilities.add`, as Kubernetes names them (`NET_ADMIN`, without `CAP_`).
    pub add_capabilities: Vec<String>,
    /// `capabilities.drop` (`ALL` drops every capability not added).
    pub drop_capabilities: Vec<String>,
    /// `runAsUser`; `None` keeps the image's user.
    pub run_as_user: Option<i64>,
    /// `runAsGroup`.
    pub run_as_group: Option<i64>,
    /// `readOnlyRootFilesystem`.
    pub read_only_root_filesystem: bool,
    /// `allowPrivilegeEscalation`: `Some(false)` sets `no_new_privs`; unset leaves it off.
    pub allow_privilege_escalation: Option<bool>,
    /// `seccompProfile.type` (of the container or, failing that, the pod); `None` is the
    /// kubelet's default, Unconfined.
    pub seccomp: Option<Profile>,
    /// `appArmorProfile.type`; `None` leaves the choice to the runtime (its default profile
    /// where AppArmor is enabled).
    pub apparmor: Option<Profile>,
}

impl SecurityContext {
    /// The CRI security context, with the kubelet's namespace options and default masked and
    /// read-only paths.
    fn to_cri(&self, namespace_options: NamespaceOption) -> LinuxContainerSecurityContext {
        let capabilities = (!self.add_capabilities.is_empty()
            || !self.drop_capabilities.is_empty())
        .then(|| Capability {
            add_capabilities: self.add_capabilities.clone(),
            drop_capabilities: self.drop_capabilities.clone(),
            ..Capability::default()
        });
        let apparmor = self.apparmor.map(Profile::to_cri);
        LinuxContainerSecurityContext {
            capabilities,
            privileged: self.privileged,
            namespace_options: Some(namespace_options),
            run_as_user: self.run_as_user.map(|value| Int64Value { value }),
            run_as_group: self.run_as_group.map(|value| Int64Value { value }),
            readonly_rootfs: self.read_only_root_filesystem,
            no_new_privs: self.allow_privilege_escalation == Some(false),
            masked_paths: MASKED_PATHS.iter().map(|p| (*p).to_string()).collect(),
            readonly_paths: READONLY_PATHS.iter().map(|p| (*p).to_string()).collect(),
            seccomp: Some(self.seccomp.unwrap_or(Profile::Unconfined).to_cri()),
            // The kubelet also fills the deprecated field, for runtimes that only read it.
            #[allow(deprecated)]
            apparmor_profile: match self.apparmor {
                Some(Profile::Unconfined) => "unconfined".into(),
                Some(Profile::RuntimeDefault) => "runtime/default".into(),
                None => String::new(),
            },
            apparmor,
            ..LinuxContainerSecurityContext::default()
        }
    }
}

impl PodSpec {
    /// A pod without containers, with a UID unique to this process and moment.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
            uid: unique_uid(),
            ..Self::default()
        }
    }

    /// The container named `name`.
    pub fn container(&self, name: &str) -> Option<&ContainerSpec> {
        self.containers.iter().find(|c| c.name == name)
    }

    /// The kubelet's pod log directory, `/var/log/pods/<namespace>_<name>_<uid>`.
    pub fn log_directory(&self) -> PathBuf {
        Path::new(POD_LOGS_DIR).join(format!("{}_{}_{}", self.namespace, self.name, self.uid))
    }

    /// Where the runtime writes the first run of container `name`'s output.
    pub fn log_path(&self, container: &str) -> PathBuf {
        self.log_directory().join(container_log_path(container))
    }

    fn namespace_options(&self) -> NamespaceOption {
        NamespaceOption {
            network: if self.host_network {
                NamespaceMode::Node
            } else {
                NamespaceMode::Pod
            } as i32,
            // The kubelet's defaults without shareProcessNamespace, hostPID, hostIPC.
            pid: NamespaceMode::Container as i32,
            ipc: NamespaceMode::Pod as i32,
            ..NamespaceOption::default()
        }
    }

    fn identity_labels(&self) -> HashMap<String, String> {
        HashMap::from([
            (labels::POD_NAME.to_string(), self.name.clone()),
            (labels::POD_NAMESPACE.to_string(), self.namespace.clone()),
            (labels::POD_UID.to_string(), self.uid.clone()),
        ])
    }

    /// The RunPodSandbox config the kubelet would send for this pod (first attempt). It is
    /// also passed along with every CreateContainer.
    pub fn sandbox_config(&self) -> PodSandboxConfig {
        let mut labels = self.labels.clone();
        labels.extend(self.identity_labels());
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: self.name.clone(),
                uid: self.uid.clone(),
                namespace: self.namespace.clone(),
                attempt: 0,
            }),
            // The kubelet leaves the hostname to the node's for hostNetwork pods.
            hostname: if self.host_network {
                String::new()
            } else {
                self.name.clone()
            },
            log_directory: self.log_directory().to_string_lossy().into_owned(),
            labels,
            annotations: self.annotations.clone(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: String::new(),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(self.namespace_options()),
                    seccomp: Some(unconfined()),
                    ..LinuxSandboxSecurityContext::default()
                }),
                ..LinuxPodSandboxConfig::default()
            }),
            ..PodSandboxConfig::default()
        }
    }

    /// The CreateContainer config the kubelet would send for `c` (first attempt), with
    /// `extra_env` (e.g. a device plugin's Allocate envs) after the container's own.
    pub fn container_config(
        &self,
        c: &ContainerSpec,
        image: ImageSpec,
        extra_env: &HashMap<String, String>,
    ) -> ContainerConfig {
        let mut envs: Vec<KeyValue> = sorted(&c.env).chain(sorted(extra_env)).collect();
        if !envs.iter().any(|kv| kv.key == "PATH") {
            envs.push(KeyValue {
                key: "PATH".into(),
                value: DEFAULT_PATH.into(),
            });
        }
        let mut labels = self.identity_labels();
        labels.insert(labels::CONTAINER_NAME.into(), c.name.clone());
        let annotations = HashMap::from([
            ("io.kubernetes.container.restartCount".into(), "0".into()),
            (
                "io.kubernetes.container.terminationMessagePath".into(),
                "/dev/termination-log".into(),
            ),
            (
                "io.kubernetes.container.terminationMessagePolicy".into(),
                "File".into(),
            ),
        ]);
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: c.name.clone(),
                attempt: 0,
            }),
            image: Some(image),
            command: c.command.clone(),
            args: c.args.clone(),
            envs,
            labels,
            annotations,
            log_path: container_log_path(&c.name),
            mounts: c.mounts.iter().map(HostMount::to_cri).collect(),
            linux: Some(LinuxContainerConfig {
                // BestEffort QoS: minimal CPU shares, first to go when memory runs out.
                resources: Some(LinuxContainerResources {
                    cpu_shares: 2,
                    oom_score_adj: 1000,
                    ..LinuxContainerResources::default()
                }),
                security_context: Some(c.security.to_cri(self.namespace_options())),
            }),
            ..ContainerConfig::default()
        }
    }
}

impl ContainerSpec {
    /// A container running `command` (the entrypoint, with its arguments) in `image`.
    pub fn new<I, S>(name: &str, image: &str, command: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            name: name.to_string(),
            image: image.to_string(),
            command: command.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }
}

/// The kubelet's log path of a container's first run, relative to the pod log directory.
fn container_log_path(container: &str) -> String {
    format!("{container}/0.log")
}

/// The kubelet's seccomp default (no `seccompDefault` in its config).
fn unconfined() -> SecurityProfile {
    Profile::Unconfined.to_cri()
}

/// Environment variables in a stable order, so requests do not depend on hash order.
fn sorted(env: &HashMap<String, String>) -> std::vec::IntoIter<KeyValue> {
    let mut pairs: Vec<KeyValue> = env
        .iter()
        .map(|(k, v)| KeyValue {
            key: k.clone(),
            value: v.clone(),
        })
        .collect();
    pairs.sort_by(|a, b| a.key.cmp(&b.key));
    pairs.into_iter()
}

/// A UID in the UUID format, unique within this boot: time, process and a counter.
fn unique_uid() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    // Low 64 bits of the time are plenty to tell runs apart.
    let t = nanos as u64;
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        std::process::id(),
        n & 0xffff,
        (t >> 48) & 0xfff,
        (t >> 36) & 0xfff,
        t & 0xffff_ffff_ffff
    )
}

/// The result of [`Cri::exec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// The command's exit status.
    pub exit_code: i32,
    /// Its standard output (lossy UTF-8).
    pub stdout: String,
    /// Its standard error (lossy UTF-8).
    pub stderr: String,
}

/// A CRI client (RuntimeService and ImageService) on a Unix socket.
#[derive(Debug, Clone)]
pub struct Cri {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    socket: PathBuf,
}

impl Cri {
    /// Connects to the CRI service on `socket`; fails if nothing listens there. The channel
    /// reconnects by itself after a runtime restart (a call right at the restart may fail).
    pub async fn connect(socket: &Path) -> Result<Self> {
        let channel = vcan_plugin::uds::connect(socket)
            .await
            .with_context(|| format!("cannot connect to the CRI socket {}", socket.display()))?;
        Ok(Self {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            socket: socket.to_path_buf(),
        })
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The runtime's `Status` (conditions RuntimeReady and NetworkReady).
    pub async fn status(&self) -> Result<StatusResponse> {
        Ok(self
            .runtime
            .clone()
            .status(StatusRequest { verbose: false })
            .await
            .context("CRI Status")?
            .into_inner())
    }

    /// Whether the runtime reports every condition (RuntimeReady, NetworkReady) true; the
    /// unmet ones come back as text.
    pub async fn ready(&self) -> Result<std::result::Result<(), String>> {
        let status = self.status().await?;
        let conditions = status.status.map(|s| s.conditions).unwrap_or_default();
        if conditions.is_empty() {
            return Ok(Err("no runtime conditions reported".into()));
        }
        let unmet: Vec<String> = conditions
            .iter()
            .filter(|c| !c.status)
            .map(|c| format!("{} ({}: {})", c.r#type, c.reason, c.message))
            .collect();
        Ok(if unmet.is_empty() {
            Ok(())
        } else {
            Err(unmet.join("; "))
        })
    }

    /// The image `reference` as the CRI image service has it, or `None` if it is not there.
    pub async fn image_id(&self, reference: &str) -> Result<Option<String>> {
        let resp = self
            .images
            .clone()
            .image_status(ImageStatusRequest {
                image: Some(ImageSpec {
                    image: reference.to_string(),
                    ..ImageSpec::default()
                }),
                verbose: false,
            })
            .await
            .with_context(|| format!("CRI ImageStatus {reference}"))?
            .into_inner();
        Ok(resp.image.map(|i| i.id))
    }

    /// RunPodSandbox with the kubelet's config for `pod` (see [`PodSpec::sandbox_config`]);
    /// returns the sandbox ID. Creates the pod log directory first, as the kubelet does.
    pub async fn run_sandbox(&self, pod: &PodSpec) -> Result<String> {
        let dir = pod.log_directory();
        tokio::fs::create_dir_all(&dir)
            .await
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let resp = self
            .runtime
            .clone()
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(pod.sandbox_config()),
                runtime_handler: String::new(),
            })
            .await
            .with_context(|| format!("RunPodSandbox {}/{}", pod.namespace, pod.name))?
            .into_inner();
        Ok(resp.pod_sandbox_id)
    }

    /// CreateContainer and StartContainer for container `c` of `pod` in `sandbox_id`, with
    /// `extra_env` added to its environment; returns the container ID.
    ///
    /// Like the kubelet, this resolves the image to its ID first (there is no registry to pull
    /// from, so a missing image is an error) and creates the container's log directory.
    pub async fn create_and_start(
        &self,
        sandbox_id: &str,
        pod: &PodSpec,
        c: &ContainerSpec,
        extra_env: &HashMap<String, String>,
    ) -> Result<String> {
        let image_id = self.image_id(&c.image).await?.with_context(|| {
            format!(
                "image {} is not in the runtime (was it imported? see `cargo xtask images`)",
                c.image
            )
        })?;
        let image = ImageSpec {
            image: image_id,
            user_specified_image: c.image.clone(),
            ..ImageSpec::default()
        };
        let log_dir = pod.log_directory().join(&c.name);
        tokio::fs::create_dir_all(&log_dir)
            .await
            .with_context(|| format!("cannot create {}", log_dir.display()))?;
        let what = format!("container {} of pod {}/{}", c.name, pod.namespace, pod.name);
        let id = self
            .runtime
            .clone()
            .create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox_id.to_string(),
                config: Some(pod.container_config(c, image, extra_env)),
                sandbox_config: Some(pod.sandbox_config()),
            })
            .await
            .with_context(|| format!("CreateContainer {what}"))?
            .into_inner()
            .container_id;
        self.runtime
            .clone()
            .start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .with_context(|| format!("StartContainer {what} ({id})"))?;
        Ok(id)
    }

    /// The container's CRI status.
    pub async fn container_status(&self, container_id: &str) -> Result<ContainerStatus> {
        self.runtime
            .clone()
            .container_status(ContainerStatusRequest {
                container_id: container_id.to_string(),
                verbose: false,
            })
            .await
            .with_context(|| format!("ContainerStatus {container_id}"))?
            .into_inner()
            .status
            .with_context(|| format!("ContainerStatus {container_id}: no status"))
    }

    /// The sandbox's CRI status (not verbose).
    pub async fn sandbox_status(&self, sandbox_id: &str) -> Result<PodSandboxStatus> {
        self.runtime
            .clone()
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: sandbox_id.to_string(),
                verbose: false,
            })
            .await
            .with_context(|| format!("PodSandboxStatus {sandbox_id}"))?
            .into_inner()
            .status
            .with_context(|| format!("PodSandboxStatus {sandbox_id}: no status"))
    }

    /// Polls ContainerStatus until the container has exited and returns its exit code; fails
    /// after `timeout`.
    pub async fn wait_exit(&self, container_id: &str, timeout: Duration) -> Result<i32> {
        let started = Instant::now();
        loop {
            let status = self.container_status(container_id).await?;
            if status.state() == ContainerState::ContainerExited {
                return Ok(status.exit_code);
            }
            if started.elapsed() >= timeout {
                bail!(
                    "container {container_id} ({}) still {:?} after {timeout:?}",
                    status
                        .metadata
                        .as_ref()
                        .map(|m| m.name.as_str())
                        .unwrap_or_default(),
                    status.state()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Container `container` of `pod`'s output so far (stdout and stderr interleaved as
    /// written), from the CRI log file with each line's timestamp and stream prefix removed.
    pub async fn logs(&self, pod: &PodSpec, container: &str) -> Result<String> {
        let path = pod.log_path(container);
        let bytes = tokio::fs::read(&path)
            .await
            .with_context(|| format!("cannot read the log {}", path.display()))?;
        Ok(parse_cri_log(&String::from_utf8_lossy(&bytes)))
    }

    /// ExecSync: runs `cmd` in the container and waits for it, at most `timeout` (which the
    /// runtime enforces too).
    pub async fn exec(
        &self,
        container_id: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> Result<ExecOutput> {
        // The CRI timeout is in whole seconds, 0 meaning none.
        let secs = i64::try_from(timeout.as_secs().max(1)).unwrap_or(i64::MAX);
        let mut client = self.runtime.clone();
        let request = client.exec_sync(ExecSyncRequest {
            container_id: container_id.to_string(),
            cmd: cmd.iter().map(|s| (*s).to_string()).collect(),
            timeout: secs,
        });
        // A margin over the runtime's own limit, in case the runtime itself hangs.
        let resp = tokio::time::timeout(timeout + Duration::from_secs(10), request)
            .await
            .with_context(|| format!("ExecSync {cmd:?} in {container_id}: no answer"))?
            .with_context(|| format!("ExecSync {cmd:?} in {container_id}"))?
            .into_inner();
        Ok(ExecOutput {
            exit_code: resp.exit_code,
            stdout: String::from_utf8_lossy(&resp.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&resp.stderr).into_owned(),
        })
    }

    /// The sandbox's network namespace file (`/var/run/netns/cni-…`), from the verbose
    /// PodSandboxStatus; `None` for a hostNetwork pod.
    pub async fn netns_path(&self, sandbox_id: &str) -> Result<Option<PathBuf>> {
        let resp = self
            .runtime
            .clone()
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: sandbox_id.to_string(),
                verbose: true,
            })
            .await
            .with_context(|| format!("PodSandboxStatus {sandbox_id} (verbose)"))?
            .into_inner();
        let info = resp
            .info
            .get("info")
            .with_context(|| format!("verbose PodSandboxStatus {sandbox_id} has no `info`"))?;
        vcan_plugin::pod::runtime::netns_from_info(info)
            .map_err(|why| anyhow::anyhow!("sandbox {sandbox_id}: {why}"))
    }

    /// StopContainer with a grace period, as the kubelet stops each container of a pod being
    /// deleted (`terminationGracePeriodSeconds`) before it stops the sandbox: the runtime sends
    /// the image's stop signal (SIGTERM) and SIGKILL once `grace` has passed. (StopPodSandbox
    /// alone kills the containers at once.)
    pub async fn stop_container(&self, container_id: &str, grace: Duration) -> Result<()> {
        let timeout = i64::try_from(grace.as_secs()).unwrap_or(i64::MAX);
        self.runtime
            .clone()
            .stop_container(StopContainerRequest {
                container_id: container_id.to_string(),
                timeout,
            })
            .await
            .with_context(|| format!("StopContainer {container_id}"))?;
        Ok(())
    }

    /// StopPodSandbox and RemovePodSandbox, which also remove its containers and network
    /// namespace.
    pub async fn remove_pod(&self, sandbox_id: &str) -> Result<()> {
        self.runtime
            .clone()
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: sandbox_id.to_string(),
            })
            .await
            .with_context(|| format!("StopPodSandbox {sandbox_id}"))?;
        self.runtime
            .clone()
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: sandbox_id.to_string(),
            })
            .await
            .with_context(|| format!("RemovePodSandbox {sandbox_id}"))?;
        Ok(())
    }

    /// Removes every pod sandbox the runtime has; returns how many there were. Tries them all
    /// and reports the first failure.
    pub async fn remove_all_pods(&self) -> Result<usize> {
        let items = self
            .runtime
            .clone()
            .list_pod_sandbox(ListPodSandboxRequest { filter: None })
            .await
            .context("ListPodSandbox")?
            .into_inner()
            .items;
        let mut first_error = None;
        for item in &items {
            if let Err(err) = self.remove_pod(&item.id).await {
                first_error.get_or_insert(err);
            }
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(items.len()),
        }
    }
}

/// Strips the CRI log format (`<RFC 3339 time> <stdout|stderr> <F|P> <text>`, `P` marking a
/// partial line continued by the next entry) down to the text.
pub fn parse_cri_log(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    for line in log.lines() {
        let mut parts = line.splitn(4, ' ');
        let (Some(_time), Some(stream), Some(tag)) = (parts.next(), parts.next(), parts.next())
        else {
            // Not CRI format: keep it rather than lose output.
            out.push_str(line);
            out.push('\n');
            continue;
        };
        if !matches!(stream, "stdout" | "stderr") {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        out.push_str(parts.next().unwrap_or_default());
        // The tag may carry more flags after a colon; only "P" (partial) has no newline.
        if tag.split(':').next() != Some("P") {
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_log_prefixes_are_stripped_and_partials_joined() {
        let log = "2024-05-01T10:00:00.000000001Z stdout F hello\n\
                   2024-05-01T10:00:00.000000002Z stderr P par\n\
                   2024-05-01T10:00:00.000000003Z stderr F tial\n\
                   2024-05-01T10:00:00.000000004Z stdout F \n\
                   2024-05-01T10:00:00.000000005Z stdout F a  b\n";
        assert_eq!(parse_cri_log(log), "hello\npartial\n\na  b\n");
        assert_eq!(parse_cri_log("garbage\n"), "garbage\n");
    }

    #[test]
    fn sandbox_config_is_the_kubelets() {
        let mut pod = PodSpec::new("ns", "p");
        pod.labels.insert("app".into(), "x".into());
        pod.annotations.insert("a".into(), "b".into());
        let cfg = pod.sandbox_config();
        let meta = cfg.metadata.clone().expect("metadata");
        assert_eq!((meta.name.as_str(), meta.namespace.as_str()), ("p", "ns"));
        assert_eq!(meta.uid, pod.uid);
        assert_eq!(cfg.hostname, "p");
        assert_eq!(cfg.log_directory, format!("/var/log/pods/ns_p_{}", pod.uid));
        assert_eq!(cfg.labels[labels::POD_NAME], "p");
        assert_eq!(cfg.labels[labels::POD_NAMESPACE], "ns");
        assert_eq!(cfg.labels[labels::POD_UID], pod.uid);
        assert_eq!(cfg.labels["app"], "x");
        assert_eq!(cfg.annotations, pod.annotations);
        let ns = |cfg: &PodSandboxConfig| {
            cfg.linux
                .as_ref()
                .and_then(|l| l.security_context.as_ref())
                .and_then(|s| s.namespace_options.as_ref())
                .map(NamespaceOption::network)
        };
        assert_eq!(ns(&cfg), Some(NamespaceMode::Pod));
        pod.host_network = true;
        let cfg = pod.sandbox_config();
        assert_eq!(ns(&cfg), Some(NamespaceMode::Node));
        assert_eq!(cfg.hostname, "");
    }

    #[test]
    fn container_config_is_the_kubelets() {
        let pod = PodSpec::new("ns", "p");
        let mut c = ContainerSpec::new("c", "img", ["sh", "-c", "true"]);
        c.env.insert("B".into(), "2".into());
        c.env.insert("A".into(), "1".into());
        let extra = HashMap::from([("VCAN".to_string(), "vcan0".to_string())]);
        let cfg = pod.container_config(&c, ImageSpec::default(), &extra);
        let keys: Vec<&str> = cfg.envs.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys, ["A", "B", "VCAN", "PATH"]);
        assert_eq!(cfg.log_path, "c/0.log");
        assert_eq!(cfg.command, ["sh", "-c", "true"]);
        assert_eq!(cfg.labels[labels::CONTAINER_NAME], "c");
        assert_eq!(cfg.labels[labels::POD_UID], pod.uid);
        assert_eq!(pod.log_path("c"), pod.log_directory().join("c/0.log"));

        c.env.insert("PATH".into(), "/x".into());
        let cfg = pod.container_config(&c, ImageSpec::default(), &HashMap::new());
        let paths: Vec<&str> = cfg
            .envs
            .iter()
            .filter(|kv| kv.key == "PATH")
            .map(|kv| kv.value.as_str())
            .collect();
        assert_eq!(paths, ["/x"]);
    }

    #[test]
    fn mounts_and_security_context_are_translated_like_the_kubelets() {
        let pod = PodSpec::new("ns", "p");
        // Without a security context: the kubelet's defaults, no capabilities field.
        let plain = ContainerSpec::new("c", "img", ["true"]);
        let cfg = pod.container_config(&plain, ImageSpec::default(), &HashMap::new());
        let sc = cfg
            .linux
            .and_then(|l| l.security_context)
            .expect("security context");
        assert_eq!(sc.capabilities, None);
        assert!(!sc.privileged && !sc.no_new_privs && !sc.readonly_rootfs);
        assert_eq!(sc.run_as_user, None);
        assert_eq!(sc.seccomp, Some(unconfined()));
        assert_eq!(sc.apparmor, None);
        assert_eq!(sc.masked_paths.len(), MASKED_PATHS.len());
        assert!(cfg.mounts.is_empty());

        let mut c = ContainerSpec::new("c", "img", Vec::<String>::new());
        c.mounts = vec![
            HostMount::new("/var/run/netns", "/var/run/netns")
                .readonly()
                .propagation(Propagation::HostToContainer),
            HostMount::new("/host/tmp", "/tmp"),
        ];
        c.security = SecurityContext {
            add_capabilities: vec!["NET_ADMIN".into()],
            drop_capabilities: vec!["ALL".into()],
            run_as_user: Some(0),
            run_as_group: Some(0),
            read_only_root_filesystem: true,
            allow_privilege_escalation: Some(false),
            seccomp: Some(Profile::RuntimeDefault),
            apparmor: Some(Profile::Unconfined),
            ..SecurityContext::default()
        };
        let cfg = pod.container_config(&c, ImageSpec::default(), &HashMap::new());
        assert!(cfg.command.is_empty(), "the image's entrypoint is kept");
        let m = &cfg.mounts[0];
        assert_eq!(
            (m.container_path.as_str(), m.host_path.as_str(), m.readonly),
            ("/var/run/netns", "/var/run/netns", true)
        );
        assert_eq!(
            m.propagation(),
            MountPropagation::PropagationHostToContainer
        );
        assert_eq!(
            cfg.mounts[1].propagation(),
            MountPropagation::PropagationPrivate
        );
        assert!(!cfg.mounts[1].readonly);
        let sc = cfg
            .linux
            .and_then(|l| l.security_context)
            .expect("security context");
        let caps = sc.capabilities.clone().expect("capabilities");
        assert_eq!(caps.add_capabilities, ["NET_ADMIN"]);
        assert_eq!(caps.drop_capabilities, ["ALL"]);
        assert!(!sc.privileged);
        assert!(sc.no_new_privs && sc.readonly_rootfs);
        assert_eq!(sc.run_as_user, Some(Int64Value { value: 0 }));
        assert_eq!(sc.run_as_group, Some(Int64Value { value: 0 }));
        assert_eq!(
            sc.seccomp.map(|p| p.profile_type()),
            Some(ProfileType::RuntimeDefault)
        );
        assert_eq!(
            sc.apparmor.map(|p| p.profile_type()),
            Some(ProfileType::Unconfined)
        );
        // allowPrivilegeEscalation: true is not no_new_privs either.
        c.security.allow_privilege_escalation = Some(true);
        let cfg = pod.container_config(&c, ImageSpec::default(), &HashMap::new());
        assert!(
            !cfg.linux
                .and_then(|l| l.security_context)
                .expect("sc")
                .no_new_privs
        );
    }

    #[test]
    fn uids_are_unique_and_uuid_shaped() {
        let a = unique_uid();
        let b = unique_uid();
        assert_ne!(a, b);
        let lens: Vec<usize> = a.split('-').map(str::len).collect();
        assert_eq!(lens, [8, 4, 4, 4, 12], "{a}");
    }
}
