//! PreStartContainer against real network namespaces and the real kernel, in the CAN test-bed VM.

mod common;

use std::path::PathBuf;

use common::{Harness, start_kubelet};
use vcan_plugin::api::deviceplugin::v1beta1::PreStartContainerRequest;
use vcan_plugin::health::{self, Health};
use vcan_plugin::link::Links;
use vcan_plugin::netns::Netns;
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
    let _kubelet = start_kubelet(h.dir.path());
    let (stop, _) = h.start_registrar();
    let mut client = h.client().await;

    let fx = NetnsFixture::new();
    let netns = PathBuf::from("/run/netns").join(fx.name());
    // Two containers of one pod, one device each; the pod names its interfaces.
    h.pod_resources.set_pod(
        "default",
        "ecu",
        &[("sim", &["vcan-0005"]), ("logger", &["vcan-0002"])],
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
    assert_eq!(h.injector.served().len(), 1);

    // A classic-only pod with default names.
    let classic = NetnsFixture::new();
    h.pod_resources.set_pod(
        "default",
        "classic",
        &[("app", &["vcan-0007", "vcan-0008"])],
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

    // After a plugin restart, recovery adopts both pods from the kubelet and the runtime.
    let adopted = h.injector.recover().await.expect("recover");
    assert_eq!(adopted, 2);

    // A pod that went away is forgotten.
    h.pod_resources.remove_pod("default", "classic");
    let gone = h.injector.reconcile().await.expect("reconcile");
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].pod.name, "classic");
    assert_eq!(h.injector.served().len(), 1);
    stop.cancel();
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
