//! Restarts of the kubelet, the plugin and containerd while pods run, in the CAN test-bed VM.

use std::time::{Duration, Instant};

use vcan_e2e::env::{RESOURCE, TestNode};
use vcan_e2e::images::CANUTILS_IMAGE;
use vcan_e2e::node::StartedPod;
use vcan_e2e::{ContainerSpec, PodSpec};
use vcan_test_support::require_testbed;

const EXEC_TIMEOUT: Duration = Duration::from_secs(30);

fn sleeper(name: &str) -> PodSpec {
    let mut c = ContainerSpec::new("app", CANUTILS_IMAGE, ["sleep", "3600"]);
    c.vcan = 2;
    let mut p = PodSpec::new("default", name);
    p.containers = vec![c];
    p
}

/// Starts a pod and checks that it runs with both interfaces up.
async fn start_and_check(t: &TestNode, name: &str) -> StartedPod {
    let started = t.run_pod_ok(&sleeper(name)).await;
    assert_interfaces_up(t, &started).await;
    started
}

/// Both interfaces exist and are up inside the pod, as its container sees them.
async fn assert_interfaces_up(t: &TestNode, pod: &StartedPod) {
    let out = t
        .node
        .cri
        .exec(
            pod.container("app"),
            &[
                "cat",
                "/sys/class/net/vcan0/operstate",
                "/sys/class/net/vcan1/operstate",
            ],
            EXEC_TIMEOUT,
        )
        .await
        .unwrap_or_else(|e| panic!("exec in {}: {e:#}", pod.spec.name));
    assert_eq!(out.exit_code, 0, "{}: {}", pod.spec.name, out.stderr);
    // vcan reports "unknown" operstate when up (it has no carrier detection).
    assert_eq!(out.stdout, "unknown\nunknown\n", "{}", pod.spec.name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the CAN test-bed VM"]
async fn kubelet_plugin_and_containerd_restarts_lose_nothing() {
    require_testbed();
    let mut t = TestNode::start(100, "127.0.0.1:9721")
        .await
        .expect("node starts");
    let first = start_and_check(&t, "before-restarts").await;

    // Kubelet restart: every socket in its directory is deleted and kubelet.sock is new.
    let restarted = Instant::now();
    t.node.kubelet.restart().await.expect("kubelet restart");
    t.node
        .kubelet
        .wait_for_resource(RESOURCE, 100, Duration::from_secs(10))
        .await
        .expect("plugin registers again");
    println!(
        "plugin re-registered {:?} after the kubelet restarted",
        restarted.elapsed()
    );
    assert_interfaces_up(&t, &first).await;
    let after_kubelet = start_and_check(&t, "after-kubelet-restart").await;

    // Plugin restart: the new process adopts both running pods from the kubelet and the runtime.
    t.plugin.restart().expect("plugin restart");
    t.node
        .kubelet
        .wait_for_resource(RESOURCE, 100, Duration::from_secs(30))
        .await
        .expect("restarted plugin registers");
    // Registration does not wait for adoption: the first reconcile pass adopts both pods.
    let adopting = Instant::now();
    while !t.plugin.log().contains("adopted running pods pods=2") {
        assert!(
            adopting.elapsed() < Duration::from_secs(30),
            "plugin log:\n{}",
            t.plugin.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_interfaces_up(&t, &first).await;
    assert_interfaces_up(&t, &after_kubelet).await;
    let after_plugin = start_and_check(&t, "after-plugin-restart").await;

    // containerd restart: running pods keep their interfaces; new pods still get theirs.
    t.containerd.restart().await.expect("containerd restart");
    assert_interfaces_up(&t, &first).await;
    let after_containerd = start_and_check(&t, "after-containerd-restart").await;

    for pod in [first, after_kubelet, after_plugin, after_containerd] {
        t.node.delete_pod(&pod).await.expect("delete");
    }
}
