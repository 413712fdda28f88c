//! The device-plugin API end to end on the host: registration, restarts, Allocate and PreStart
//! against the kubelet stand-in and a runtime double over real Unix sockets.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{Harness, RESOURCE, WAIT, wait_registered};
use tonic::Code;
use vcan_plugin::api::deviceplugin::v1beta1::{
    AllocateRequest, ContainerAllocateRequest, Empty, ListAndWatchResponse,
    PreStartContainerRequest,
};
use vcan_plugin::kubelet::registration::{QUIET, RECHECK};
use vcan_plugin::telemetry::health::Health;
use vcan_test_support::kubelet::Registered;

fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The registration's next ListAndWatch snapshot.
async fn next_snapshot(reg: &mut Registered) -> ListAndWatchResponse {
    tokio::time::timeout(WAIT, reg.snapshots.recv())
        .await
        .expect("a snapshot in time")
        .expect("the stream is open")
}

#[tokio::test]
async fn registers_with_prestart_required_and_streams_a_full_snapshot() {
    let h = Harness::new(100);
    let mut kubelet = h.start_kubelet().await;
    let (stop, registered) = h.start_registrar();

    let mut reg = kubelet.next_registration(WAIT).await.expect("registration");
    assert_eq!(reg.request.version, "v1beta1");
    assert_eq!(reg.request.resource_name, RESOURCE);
    assert_eq!(reg.request.endpoint, "example.com-vcan.sock");
    assert!(
        reg.request
            .options
            .expect("options in the request")
            .pre_start_required
    );
    assert!(reg.options.pre_start_required);

    let first = next_snapshot(&mut reg).await;
    assert_eq!(first.devices.len(), 100);
    assert!(
        first
            .devices
            .iter()
            .all(|d| d.health == "Healthy" && d.id.len() <= 63)
    );
    assert_eq!(first.devices[7].id, "vcan-0007");

    // The node loses vcan: every device turns unhealthy in a new full snapshot, and back.
    h.health
        .send(Health::Unhealthy("no vcan".into()))
        .expect("health watchers");
    let second = next_snapshot(&mut reg).await;
    assert_eq!(second.devices.len(), 100);
    assert!(second.devices.iter().all(|d| d.health == "Unhealthy"));
    h.health.send(Health::Healthy).expect("health watchers");
    let third = next_snapshot(&mut reg).await;
    assert!(third.devices.iter().all(|d| d.health == "Healthy"));

    // The flag follows the kubelet's answer, which comes after it dialled back.
    wait_registered(&registered).await;
    stop.cancel();
}

#[tokio::test]
async fn options_are_never_empty() {
    let h = Harness::new(3);
    let _kubelet = h.start_kubelet().await;
    let (stop, _) = h.start_registrar();
    let mut client = h.client().await;
    let options = client
        .get_device_plugin_options(Empty {})
        .await
        .expect("options")
        .into_inner();
    assert!(options.pre_start_required);
    stop.cancel();
}

#[tokio::test]
async fn every_kubelet_restart_ends_registered_with_an_endpoint_the_kubelet_can_dial() {
    let h = Harness::new(4);
    let mut kubelet = h.start_kubelet().await;
    let (stop, registered) = h.start_registrar();
    kubelet.next_registration(WAIT).await.expect("registration");
    let socket = h.dir.path().join("example.com-vcan.sock");

    // Gaps between the clean-up and the new kubelet.sock from none to 50 ms: some restarts are
    // noticed first through the closed stream, some through the deleted socket, some through
    // the new kubelet.sock, and the plugin may bind again before the clean-up has run.
    for round in 0..20u64 {
        let gap = Duration::from_millis((round * 37) % 51);
        kubelet
            .restart_with_gap(gap)
            .await
            .expect("kubelet restart");
        // The kubelet stand-in reports a registration only after it dialled the endpoint back,
        // read its options and opened its ListAndWatch stream.
        let mut reg = kubelet.next_registration(WAIT).await.expect("registration");
        assert_eq!(
            reg.request.endpoint, "example.com-vcan.sock",
            "round {round}"
        );
        assert_eq!(
            next_snapshot(&mut reg).await.devices.len(),
            4,
            "round {round}"
        );
        assert!(
            socket.exists(),
            "round {round}: socket gone after registering"
        );
    }
    // Exactly one registration per restart: no late duplicate, neither pending now nor made by
    // the plugin's next fallback checks (every RECHECK) or a debounced directory event.
    assert!(kubelet.try_next_registration().is_none());
    let window = RECHECK * 2 + QUIET;
    if let Ok(late) = kubelet.next_registration(window).await {
        panic!(
            "a late duplicate registration within {window:?}: {:?}",
            late.request
        );
    }
    // The flag follows the kubelet's answer, which comes after it dialled back.
    wait_registered(&registered).await;
    stop.cancel();
}

#[tokio::test]
async fn registration_waits_for_the_kubelet_and_serves_meanwhile() {
    let h = Harness::new(2);
    let (stop, registered) = h.start_registrar();
    // The plugin serves its socket before any kubelet exists.
    let mut client = h.client().await;
    client
        .get_device_plugin_options(Empty {})
        .await
        .expect("options");
    assert!(!registered.load(std::sync::atomic::Ordering::SeqCst));
    let mut kubelet = h.start_kubelet().await;
    kubelet.next_registration(WAIT).await.expect("registration");
    stop.cancel();
}

#[tokio::test]
async fn allocate_names_the_interfaces_and_rejects_bad_ids() {
    let h = Harness::new(10);
    let _kubelet = h.start_kubelet().await;
    let (stop, _) = h.start_registrar();
    let mut client = h.client().await;

    let ok = client
        .allocate(AllocateRequest {
            container_requests: vec![ContainerAllocateRequest {
                devices_ids: ids(&["vcan-0003", "vcan-0001"]),
            }],
        })
        .await
        .expect("allocate")
        .into_inner();
    assert_eq!(ok.container_responses.len(), 1);
    assert_eq!(
        ok.container_responses[0].envs["VCAN_INTERFACES"],
        "vcan0,vcan1"
    );

    for (bad, expected) in [
        (ids(&[]), "no device IDs"),
        (ids(&["vcan-0099"]), "unknown device ID \"vcan-0099\""),
        (ids(&["gpu-0001"]), "unknown device ID"),
        (ids(&["vcan-0001", "vcan-0001"]), "appears more than once"),
    ] {
        let status = client
            .allocate(AllocateRequest {
                container_requests: vec![ContainerAllocateRequest {
                    devices_ids: bad.clone(),
                }],
            })
            .await
            .expect_err("bad ids");
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
        assert!(status.message().contains(expected), "{}", status.message());

        let status = client
            .pre_start_container(PreStartContainerRequest {
                devices_ids: bad.clone(),
            })
            .await
            .expect_err("bad ids");
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
        assert!(status.message().contains(expected), "{}", status.message());
    }
    stop.cancel();
}

/// A named network namespace on the host, removed on drop.
struct HostNetns(String);

impl HostNetns {
    fn new(tag: &str) -> Self {
        let name = format!("vcanplug-{}-{tag}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip");
        assert!(ok.success(), "ip netns add {name}");
        HostNetns(name)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.0)
    }
}

impl Drop for HostNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[tokio::test]
async fn prestart_errors_name_the_pod_and_the_problem() {
    let h = Harness::new(10);
    let kubelet = h.start_kubelet().await;
    let (stop, _) = h.start_registrar();
    let mut client = h.client().await;
    let ns = HostNetns::new("errors");

    // The devices belong to no pod.
    let status = client
        .pre_start_container(PreStartContainerRequest {
            devices_ids: ids(&["vcan-0000"]),
        })
        .await
        .expect_err("no owner");
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        status.message().contains("no pod holds devices"),
        "{}",
        status.message()
    );

    // The pod is known to the kubelet but has no sandbox.
    kubelet.record_pod("default", "nosandbox", &[("app", RESOURCE, &["vcan-0000"])]);
    let status = client
        .pre_start_container(PreStartContainerRequest {
            devices_ids: ids(&["vcan-0000"]),
        })
        .await
        .expect_err("no sandbox");
    assert!(
        status
            .message()
            .contains("no ready sandbox for pod default/nosandbox"),
        "{}",
        status.message()
    );

    // hostNetwork pods are refused; nothing is created in the node's namespace.
    kubelet.record_pod("default", "hostnet", &[("app", RESOURCE, &["vcan-0001"])]);
    h.runtime.add("default", "hostnet", None, &[]);
    let status = client
        .pre_start_container(PreStartContainerRequest {
            devices_ids: ids(&["vcan-0001"]),
        })
        .await
        .expect_err("host network");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status
            .message()
            .contains("default/hostnet uses hostNetwork"),
        "{}",
        status.message()
    );

    // Bad annotations fail with what is wrong.
    kubelet.record_pod(
        "team",
        "badnames",
        &[("app", RESOURCE, &["vcan-0002", "vcan-0003"])],
    );
    h.runtime.add(
        "team",
        "badnames",
        Some(ns.path()),
        &[("example.com/names", "can0,can0")],
    );
    let status = client
        .pre_start_container(PreStartContainerRequest {
            devices_ids: ids(&["vcan-0002", "vcan-0003"]),
        })
        .await
        .expect_err("duplicate names");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("team/badnames"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("\"can0\" appears more than once"),
        "{}",
        status.message()
    );

    h.runtime.add(
        "team",
        "badnames",
        Some(ns.path()),
        &[("example.com/speed", "fast")],
    );
    let status = client
        .pre_start_container(PreStartContainerRequest {
            devices_ids: ids(&["vcan-0002"]),
        })
        .await
        .expect_err("unknown option");
    assert!(
        status
            .message()
            .contains("unknown annotation example.com/speed"),
        "{}",
        status.message()
    );
    stop.cancel();
}

#[tokio::test]
async fn prestart_reaches_the_pods_own_namespace_and_retries_when_rate_limited() {
    let h = Harness::new(10);
    let kubelet = h.start_kubelet().await;
    let (stop, _) = h.start_registrar();
    let mut client = h.client().await;
    let ns = HostNetns::new("reach");
    kubelet.record_pod("default", "app", &[("main", RESOURCE, &["vcan-0004"])]);
    h.runtime.add("default", "app", Some(ns.path()), &[]);
    kubelet.refuse_lists(3);

    let status = client
        .pre_start_container(PreStartContainerRequest {
            devices_ids: ids(&["vcan-0004"]),
        })
        .await;
    // The three rate-limited answers were retried.
    assert!(kubelet.list_calls() >= 4, "{} calls", kubelet.list_calls());
    if std::path::Path::new("/sys/module/vcan").exists() {
        status.expect("vcan created");
    } else {
        // This host's kernel has no vcan (the VM tests cover creation): the request got as far as
        // creating the link in the pod's namespace and says what to do.
        let status = status.expect_err("no vcan on this kernel");
        assert_eq!(status.code(), Code::Internal);
        assert!(
            status.message().contains("pod default/app"),
            "{}",
            status.message()
        );
        assert!(
            status.message().contains("modprobe vcan"),
            "{}",
            status.message()
        );
    }
    stop.cancel();
}

/// Twenty PreStarts' pod lookups at once share a few PodResources listings instead of making one
/// each, every one of them sees every pod, and a lookup after them makes a listing of its own.
#[tokio::test]
async fn concurrent_pod_lookups_share_listings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("pod-resources").join("kubelet.sock");
    let kubelet = vcan_test_support::kubelet::Kubelet::start(&dir.path().join("dp"), &socket)
        .await
        .expect("kubelet stand-in");
    for i in 0..20 {
        let id = format!("vcan-{i}");
        kubelet.record_pod(
            "default",
            &format!("p{i}"),
            &[("app", RESOURCE, &[id.as_str()])],
        );
    }
    let client = vcan_plugin::pod::resources::PodResources::new(&socket);
    let lookups: Vec<_> = (0..20)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.pods_with(RESOURCE).await })
        })
        .collect();
    for lookup in lookups {
        let pods = lookup.await.expect("task").expect("listing");
        assert_eq!(pods.len(), 20);
    }
    let shared = kubelet.list_calls();
    assert!(
        (1..=3).contains(&shared),
        "20 lookups at once made {shared} List calls"
    );
    client.pods_with(RESOURCE).await.expect("listing");
    assert_eq!(
        kubelet.list_calls(),
        shared + 1,
        "a later lookup lists again"
    );
}

/// The PodResources listing made after an Allocate answers the container's PreStart without a
/// listing of its own, and never for devices allocated again after it was made: a device handed
/// to another pod is looked up afresh.
#[tokio::test]
async fn a_pod_lookup_after_an_allocate_reads_the_listing_made_after_it() {
    use vcan_plugin::pod::resources::{OwnerSource, PodResources};
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("pod-resources").join("kubelet.sock");
    let kubelet = vcan_test_support::kubelet::Kubelet::start(&dir.path().join("dp"), &socket)
        .await
        .expect("kubelet stand-in");
    let client = PodResources::new(&socket);
    let ids = vec!["vcan-0".to_string(), "vcan-1".to_string()];
    kubelet.record_pod(
        "default",
        "first",
        &[("app", RESOURCE, &["vcan-0", "vcan-1"])],
    );
    client.allocated(RESOURCE, &ids);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while kubelet.list_calls() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no listing after the Allocate"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let the listing finish.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let listed = kubelet.list_calls();
    let found = client.owner(RESOURCE, &ids).await.expect("owner");
    assert_eq!(
        (found.owner.pod.name.as_str(), found.source),
        ("first", OwnerSource::Remembered)
    );
    assert_eq!(kubelet.list_calls(), listed, "answered from memory");

    // The pod is gone and its devices go to another pod: the old listing must not answer.
    kubelet.forget("default", "first");
    kubelet.record_pod(
        "default",
        "second",
        &[("app", RESOURCE, &["vcan-0", "vcan-1"])],
    );
    client.allocated(RESOURCE, &ids);
    let found = client.owner(RESOURCE, &ids).await.expect("owner");
    // From a listing of its own, or from the one after the new Allocate if that came first.
    assert_eq!(found.owner.pod.name, "second");

    // Devices whose Allocate this process did not see (it started later) are looked up afresh.
    kubelet.record_pod("default", "older", &[("app", RESOURCE, &["vcan-7"])]);
    let found = client
        .owner(RESOURCE, &["vcan-7".to_string()])
        .await
        .expect("owner");
    assert_eq!(
        (found.owner.pod.name.as_str(), found.source),
        ("older", OwnerSource::Listed)
    );
}
