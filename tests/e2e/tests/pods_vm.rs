//! Pods on a real node: containerd's CRI, the kubelet stand-in, the vcan-plugin daemon, in the
//! CAN test-bed VM. One node serves every scenario in order (containerd is one per guest).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use vcan_e2e::env::TestNode;
use vcan_e2e::images::CANUTILS_IMAGE;
use vcan_e2e::node::StartedPod;
use vcan_e2e::{ContainerSpec, PodSpec};
use vcan_test_support::{require_testbed, wait_for_can_listener};

const EXIT_TIMEOUT: Duration = Duration::from_secs(120);
/// `candump -L` prints `(timestamp) interface frame`: the seed frame as it must arrive.
const SEED_FRAME: &str = "5A1#11.2233.44556677.88";
const SEED_LOGGED: &str = "vcan0 5A1#1122334455667788";

fn container(name: &str, vcan: u32, script: &str) -> ContainerSpec {
    let mut c = ContainerSpec::new(name, CANUTILS_IMAGE, ["sh", "-c", script]);
    c.vcan = vcan;
    c
}

fn pod(name: &str, containers: Vec<ContainerSpec>) -> PodSpec {
    let mut p = PodSpec::new("default", name);
    p.containers = containers;
    p
}

/// Strips candump -L's timestamps.
fn frames(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.split_once(' ').map(|(_, rest)| rest.to_string()))
        .collect()
}

async fn exit_code(t: &TestNode, started: &StartedPod, name: &str) -> i32 {
    t.node
        .cri
        .wait_exit(started.container(name), EXIT_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{}/{name}: {e:#}", started.spec.name))
}

async fn served_pods(t: &TestNode) -> u64 {
    let (_, body) = t.plugin.http_get("/metrics").expect("metrics");
    body.lines()
        .find(|l| l.starts_with("vcan_plugin_pods_served{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no pods_served in\n{body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the CAN test-bed VM"]
async fn pods_get_working_isolated_interfaces_before_their_first_instruction() {
    require_testbed();
    let t = TestNode::start(100, "127.0.0.1:9720")
        .await
        .expect("node starts");
    assert!(t.node.kubelet.prestart_required("socketcan.io/vcan"));

    race_free_for_twenty_pods_started_at_once(&t).await;
    containers_of_a_pod_share_a_bus_that_other_pods_do_not_see(&t).await;
    annotations_choose_names_and_classic_can(&t).await;
    bad_pods_fail_with_the_plugins_message(&t).await;
    deleting_pods_removes_their_interfaces_and_state(&t).await;
}

/// Every container checks at its first instruction that its interfaces exist and exits non-zero
/// otherwise; twenty such pods start concurrently.
async fn race_free_for_twenty_pods_started_at_once(t: &TestNode) {
    let script = "test -e /sys/class/net/vcan0 && test -e /sys/class/net/vcan1 \
                  || { echo missing; exit 3; }; echo \"$VCAN_INTERFACES\"";
    let specs: Vec<PodSpec> = (0..20)
        .map(|i| pod(&format!("racefree-{i}"), vec![container("app", 2, script)]))
        .collect();
    let started = Instant::now();
    let runs = futures::future::join_all(specs.iter().map(|s| t.node.run_pod(s))).await;
    let mut pods = Vec::new();
    for (spec, run) in specs.iter().zip(runs) {
        let pod = run.unwrap_or_else(|e| panic!("{}: {e:#}", spec.name));
        assert_eq!(pod.failure, None, "{}", spec.name);
        pods.push(pod);
    }
    for pod in &pods {
        assert_eq!(
            exit_code(t, pod, "app").await,
            0,
            "{} started without its interfaces",
            pod.spec.name
        );
        let log = t.node.cri.logs(&pod.spec, "app").await.expect("logs");
        assert_eq!(log, "vcan0,vcan1\n", "{}", pod.spec.name);
    }
    println!(
        "20 pods started at once, all saw their interfaces at once, in {:?}",
        started.elapsed()
    );
    for pod in &pods {
        t.node.delete_pod(pod).await.expect("delete");
    }
}

async fn containers_of_a_pod_share_a_bus_that_other_pods_do_not_see(t: &TestNode) {
    // A second pod listens on its own vcan0 the whole time.
    let outsider = t
        .node
        .run_pod(&pod(
            "outsider",
            vec![container("listen", 1, "timeout 60 candump -L vcan0; true")],
        ))
        .await
        .expect("outsider");
    wait_for_can_listener(
        &t.netns_name(&outsider).await,
        "vcan0",
        Duration::from_secs(30),
    );

    // Each container asks for one device: the pod gets vcan0 and vcan1, created once for both.
    // The listener starts first; the sender waits until it is bound (per-netns rcvlist) and sends.
    let wait_and_send = format!(
        "test -e /sys/class/net/vcan1 || exit 4; \
         for i in $(seq 600); do grep -q '^ *vcan0 ' /proc/net/can/rcvlist_all && break; \
         sleep 0.1; done; cansend vcan0 {SEED_FRAME}"
    );
    let bus = t
        .node
        .run_pod(&pod(
            "bus",
            vec![
                container("listener", 1, "timeout 60 candump -L -n 1 vcan0"),
                container("sender", 1, &wait_and_send),
            ],
        ))
        .await
        .expect("bus pod");
    assert_eq!(bus.failure, None);
    assert_eq!(exit_code(t, &bus, "sender").await, 0);
    assert_eq!(
        exit_code(t, &bus, "listener").await,
        0,
        "listener got no frame"
    );
    let heard = t.node.cri.logs(&bus.spec, "listener").await.expect("logs");
    assert_eq!(frames(&heard), [SEED_LOGGED]);

    // The outsider heard nothing of it.
    t.node
        .cri
        .exec(
            outsider.container("listen"),
            &["pkill", "candump"],
            Duration::from_secs(10),
        )
        .await
        .ok();
    exit_code(t, &outsider, "listen").await;
    let overheard = t
        .node
        .cri
        .logs(&outsider.spec, "listen")
        .await
        .expect("logs");
    assert_eq!(
        overheard, "",
        "another pod's frame leaked into the outsider's bus"
    );
    t.node.delete_pod(&bus).await.expect("delete");
    t.node.delete_pod(&outsider).await.expect("delete");
}

async fn annotations_choose_names_and_classic_can(t: &TestNode) {
    let mut spec = pod(
        "classic",
        vec![container(
            "app",
            2,
            "cat /sys/class/net/can0/mtu /sys/class/net/can1/mtu; test ! -e /sys/class/net/vcan0",
        )],
    );
    spec.annotations = HashMap::from([
        ("socketcan.io/names".to_string(), "can0,can1".to_string()),
        ("socketcan.io/fd".to_string(), "false".to_string()),
    ]);
    let started = t.node.run_pod(&spec).await.expect("classic pod");
    assert_eq!(started.failure, None);
    assert_eq!(exit_code(t, &started, "app").await, 0);
    assert_eq!(
        t.node.cri.logs(&spec, "app").await.expect("logs"),
        "16\n16\n"
    );
    t.node.delete_pod(&started).await.expect("delete");

    // The default is CAN FD capable.
    let spec = pod(
        "fd",
        vec![container("app", 1, "cat /sys/class/net/vcan0/mtu")],
    );
    let started = t.node.run_pod(&spec).await.expect("fd pod");
    assert_eq!(exit_code(t, &started, "app").await, 0);
    assert_eq!(t.node.cri.logs(&spec, "app").await.expect("logs"), "72\n");
    t.node.delete_pod(&started).await.expect("delete");
}

async fn bad_pods_fail_with_the_plugins_message(t: &TestNode) {
    let mut dup = pod("dupnames", vec![container("app", 2, "true")]);
    dup.annotations = HashMap::from([("socketcan.io/names".to_string(), "can0,can0".to_string())]);
    let started = t.node.run_pod(&dup).await.expect("admitted");
    let failure = started.failure.clone().expect("must fail");
    assert!(failure.contains("default/dupnames"), "{failure}");
    assert!(
        failure.contains("\"can0\" appears more than once"),
        "{failure}"
    );
    assert!(
        started.containers.is_empty(),
        "a container started despite the bad annotation"
    );
    t.node.delete_pod(&started).await.expect("delete");

    let mut host = pod("hostnet", vec![container("app", 1, "true")]);
    host.host_network = true;
    let before = std::fs::read_dir("/sys/class/net").expect("sysfs").count();
    let started = t.node.run_pod(&host).await.expect("admitted");
    let failure = started.failure.clone().expect("must fail");
    assert!(failure.contains("uses hostNetwork"), "{failure}");
    assert_eq!(
        std::fs::read_dir("/sys/class/net").expect("sysfs").count(),
        before,
        "the node's namespace changed"
    );
    t.node.delete_pod(&started).await.expect("delete");
}

async fn deleting_pods_removes_their_interfaces_and_state(t: &TestNode) {
    let spec = pod("shortlived", vec![container("app", 2, "sleep 600")]);
    let started = t.node.run_pod(&spec).await.expect("pod");
    let netns = t
        .node
        .cri
        .netns_path(&started.sandbox)
        .await
        .expect("status")
        .expect("netns");
    let deadline = Instant::now() + Duration::from_secs(30);
    while served_pods(t).await < 1 {
        assert!(Instant::now() < deadline, "pod never counted as served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    t.node.delete_pod(&started).await.expect("delete");
    assert!(
        !netns.exists(),
        "the pod's namespace (and its interfaces) outlived it"
    );
    // The plugin forgets the pod at its next look at the kubelet.
    let deadline = Instant::now() + Duration::from_secs(30);
    while served_pods(t).await != 0 {
        assert!(
            Instant::now() < deadline,
            "plugin still serves a deleted pod"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
