//! PreStartContainer against real network namespaces and the real kernel, in the CAN test-bed VM.

mod common;

use std::path::PathBuf;

use common::{Harness, RESOURCE};
use vcan_plugin::api::deviceplugin::v1beta1::PreStartContainerRequest;
use vcan_plugin::kernel::link::Links;
use vcan_plugin::kernel::netns::Netns;
use vcan_plugin::telemetry::health::{self, Health};
use vcan_test_support::{NetnsFixture, require_testbed};

fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn vcans(fx: &NetnsFixture) -> Vec<(String, u32, bool)> {
    let mut links = Links::open(&Netns::Path(PathBuf::from("/run/netns").join(fx.name())))
        .expect("open namespace");
    let mut list: Vec<_> = links
        .list_vcan()
        .expect("list")
        .into_iter()
        .map(|l| (l.name, l.mtu, l.up))
        .collect();
    list.sort();
    list
}

#[tokio::test]
#[ignore = "needs the CAN test-bed VM"]
async fn prestart_creates_the_pods_named_fd_interfaces_once_for_all_containers() {
    require_testbed();
    let h = Harness::new(10);
    let kubelet = h.start_kubelet().await;
    let (stop, _) = h.start_registrar();
    let mut client = h.client().await;

    let fx = NetnsFixture::new();
    let netns = PathBuf::from("/run/netns").join(fx.name());
    // Two containers of one pod, one device each; the pod names its interfaces.
    kubelet.record_pod(
        "default",
        "ecu",
        &[
            ("sim", RESOURCE, &["vcan-0005"]),
            ("logger", RESOURCE, &["vcan-0002"]),
        ],
    );
    h.runtime.add(
        "default",
        "ecu",
        Some(netns.clone()),
        &[("example.com/names", "can0,can1")],
    );
    client
        .pre_start_container(PreStartContainerRequest {
            devices_ids: ids(&["vcan-0005"]),
        })
        .await
        .expect("first container");
    let expected = vec![
        ("can0".to_string(), 72, true),
        ("can1".to_string(), 72, true),
    ];
    assert_eq!(vcans(&fx), expected);
    // The sibling container and a restart of the first find them in place: no clash, no change.
    client
        .pre_start_container(PreStartContainerRequest {
            devices_ids: ids(&["vcan-0002"]),
        })
        .await
        .expect("second container");
    client
        .pre_start_container(PreStartContainerRequest {
            devices_ids: ids(&["vcan-0005"]),
        })
        .await
        .expect("restarted container");
    assert_eq!(vcans(&fx), expected);
    assert_eq!(h.server.served().len(), 1);

    // A classic-only pod with default names.
    let classic = NetnsFixture::new();
    kubelet.record_pod(
        "default",
        "classic",
        &[("app", RESOURCE, &["vcan-0007", "vcan-0008"])],
    );
    h.runtime.add(
        "default",
        "classic",
        Some(PathBuf::from("/run/netns").join(classic.name())),
        &[("example.com/fd", "false")],
    );
    client
        .pre_start_container(PreStartContainerRequest {
            devices_ids: ids(&["vcan-0007", "vcan-0008"]),
        })
        .await
        .expect("classic pod");
    assert_eq!(
        vcans(&classic),
        vec![
            ("vcan0".to_string(), 16, true),
            ("vcan1".to_string(), 16, true)
        ]
    );

    // A plugin restart: the registration stops, a process with nothing in memory starts and its
    // first pass adopts both pods from the kubelet and the runtime.
    stop.cancel();
    let restarted = h.fresh_server();
    assert!(restarted.served().is_empty());
    let pass = restarted.reconcile().await;
    assert_eq!(pass.adopted.len(), 2, "{pass:?}");
    assert_eq!(restarted.served().len(), 2);
    assert_eq!(vcans(&fx), expected, "adoption changes nothing in the pods");

    // Missing from PodResources while the sandbox runs: nothing is released.
    kubelet.forget("default", "classic");
    let pass = restarted.reconcile().await;
    assert!(pass.released.is_empty(), "{pass:?}");
    assert_eq!(restarted.served().len(), 2);

    // The sandbox goes (the runtime forgets it, its namespace is deleted): released.
    h.runtime.remove("default", "classic");
    drop(classic);
    let pass = restarted.reconcile().await;
    assert_eq!(pass.released.len(), 1, "{pass:?}");
    assert_eq!(pass.released[0].pod.name, "classic");
    assert_eq!(restarted.served().len(), 1);
}

#[test]
#[ignore = "needs the CAN test-bed VM"]
fn the_health_probe_sees_vcan_without_touching_this_namespace() {
    require_testbed();
    let before = Links::current().expect("links").list().expect("list");
    assert_eq!(health::probe(), Health::Healthy);
    assert_eq!(
        Links::current().expect("links").list().expect("list"),
        before
    );
}
