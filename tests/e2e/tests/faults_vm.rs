//! Faults the way they really happen, in the CAN test-bed VM: kubelet restarts that wipe the
//! device-plugin directory, a PodResources listing that stays empty, a hung and a restarted
//! containerd, the plugin killed in the middle of a PreStart, and hundreds of pods coming and
//! going. Running pods must lose nothing, and nothing may be left behind.
//!
//! One node serves three resources: private vcans and two shared buses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use vcan_e2e::env::{RESOURCE, TestNode};
use vcan_e2e::images::CANUTILS_IMAGE;
use vcan_e2e::node::StartedPod;
use vcan_e2e::wait::until;
use vcan_e2e::{ContainerSpec, PodSpec};
use vcan_test_support::kubelet::ContainerAllocation;
use vcan_test_support::{parse_cangw_listing, require_testbed, run_ok, wait_for_can_listener};

const BUS_PT: &str = "socketcan.io/bus-powertrain";
const BUS_BODY: &str = "socketcan.io/bus-body";
const DEVICES: u32 = 16;
const BUS_MEMBERS: usize = 8;
const STATE_DIR: &str = "/run/vcan-node/state";
const PIN_DIR: &str = "/sys/fs/bpf/vcan-plugin";
const PROGRAMS: [&str; 2] = ["vcan_ingress", "vcan_egress"];
const EXEC_TIMEOUT: Duration = Duration::from_secs(90);
/// Longer than the plugin's reconcile interval (10 s), so a pass has run.
const RECONCILE: Duration = Duration::from_secs(25);
const TX_CLASSIC: &str = "vcan_plugin_can_frames_total{direction=\"tx\",kind=\"classic\",interface=\"vcan0\",namespace=\"default\",pod=\"steady\"}";

fn resources() -> [(&'static str, usize); 3] {
    [
        (RESOURCE, DEVICES as usize),
        (BUS_PT, BUS_MEMBERS),
        (BUS_BODY, BUS_MEMBERS),
    ]
}

async fn start_node() -> TestNode {
    std::fs::create_dir_all("/run/vcan-node").expect("node dir");
    let config = PathBuf::from("/run/vcan-node/fault-buses.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"buses": [
                {{"name": "powertrain", "members": {BUS_MEMBERS}, "interface": "can0"}},
                {{"name": "body", "members": {BUS_MEMBERS}, "interface": "can1"}}
            ]}}"#
        ),
    )
    .expect("bus config");
    TestNode::start_with(
        DEVICES,
        "127.0.0.1:9740",
        vec![
            "--bus-config".into(),
            config.display().to_string(),
            "--state-dir".into(),
            STATE_DIR.into(),
        ],
        &resources(),
    )
    .await
    .expect("node starts")
}

fn sleeper(name: &str, vcan: u32, buses: &[&str]) -> PodSpec {
    let mut c = ContainerSpec::new("app", CANUTILS_IMAGE, ["sleep", "3600"]);
    c.vcan = vcan;
    c.resources = buses.iter().map(|b| (b.to_string(), 1)).collect();
    let mut p = PodSpec::new("default", name);
    p.containers = vec![c];
    p
}

async fn exec(t: &TestNode, pod: &StartedPod, cmd: &[&str]) -> String {
    let out = t
        .node
        .cri
        .exec(pod.container("app"), cmd, EXEC_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("exec {cmd:?} in {}: {e:#}", pod.spec.name));
    assert_eq!(
        out.exit_code, 0,
        "{cmd:?} in {}: {}{}",
        pod.spec.name, out.stdout, out.stderr
    );
    out.stdout
}

async fn netns_of(t: &TestNode, pod: &StartedPod) -> PathBuf {
    t.node
        .cri
        .netns_path(&pod.sandbox)
        .await
        .expect("sandbox status")
        .expect("a pod network namespace")
}

/// `name kind up` of every vcan and vxcan link in the namespace file `netns`.
fn links(netns: &Path) -> Vec<String> {
    let ns = format!("--net={}", netns.display());
    let text = run_ok("nsenter", &[&ns, "ip", "-d", "-o", "link", "show"]);
    let mut out: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let name = l.split(": ").nth(1)?.split('@').next()?.to_string();
            let kind = ["vcan", "vxcan"]
                .into_iter()
                .find(|k| l.contains(&format!(" {k} ")))?;
            Some(format!("{name} {kind} up={}", l.contains(",UP")))
        })
        .collect();
    out.sort();
    out
}

/// The can-gw rules in a bus's namespace (none when the namespace does not exist).
fn bus_rules(bus: &str) -> usize {
    let ns = Path::new(STATE_DIR).join("buses").join(bus);
    if !ns.exists() {
        return 0;
    }
    // `cangw -L` lists the rules and then exits with a non-zero status.
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .args(["cangw", "-L"])
        .output()
        .expect("nsenter runs");
    parse_cangw_listing(&String::from_utf8_lossy(&out.stdout)).len()
}

fn bpftool(args: &[&str]) -> Value {
    let mut all = vec!["-j"];
    all.extend_from_slice(args);
    serde_json::from_str(&run_ok("bpftool", &all)).expect("bpftool JSON")
}

/// Everything a leak shows in, counted.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Footprint {
    our_programs: usize,
    pins: usize,
    counter_entries: usize,
    slot_entries: usize,
    netns_files: usize,
    bus_namespaces: usize,
    rules: BTreeMap<&'static str, usize>,
    /// Per-pod traffic series and resource gauges in /metrics.
    traffic_series: usize,
    pods_served: BTreeMap<String, String>,
}

fn footprint(t: &TestNode) -> Footprint {
    let progs = bpftool(&["prog", "show"]);
    let entries = |map: &str| {
        bpftool(&["map", "dump", "pinned", &format!("{PIN_DIR}/{map}")])
            .as_array()
            .map_or(0, Vec::len)
    };
    let count = |dir: &Path| std::fs::read_dir(dir).map_or(0, |d| d.count());
    let (_, body) = t.plugin.http_get("/metrics").expect("metrics");
    Footprint {
        our_programs: progs
            .as_array()
            .expect("programs")
            .iter()
            .filter(|p| PROGRAMS.contains(&p["name"].as_str().unwrap_or_default()))
            .count(),
        pins: count(Path::new(PIN_DIR)),
        counter_entries: entries("vcan_cnt_v1"),
        slot_entries: entries("vcan_slots_v1"),
        netns_files: count(Path::new("/var/run/netns")),
        bus_namespaces: count(&Path::new(STATE_DIR).join("buses")),
        rules: BTreeMap::from([
            ("powertrain", bus_rules("powertrain")),
            ("body", bus_rules("body")),
        ]),
        traffic_series: body
            .lines()
            .filter(|l| l.starts_with("vcan_plugin_can_"))
            .count(),
        pods_served: body
            .lines()
            .filter_map(|l| l.strip_prefix("vcan_plugin_pods_served"))
            .filter_map(|l| l.rsplit_once(' '))
            .map(|(labels, v)| (labels.to_string(), v.to_string()))
            .collect(),
    }
}

/// A frame sent by `from` on its bus interface reaches `to` once.
async fn frame_crosses(
    t: &TestNode,
    from: &StartedPod,
    to: &StartedPod,
    ifname: &str,
    frame: &str,
) {
    let to_ns = netns_of(t, to).await;
    let listen = {
        let cri = t.node.cri.clone();
        let container = to.container("app").to_string();
        let ifname = ifname.to_string();
        tokio::spawn(async move {
            cri.exec(
                &container,
                &["timeout", "60", "candump", "-L", "-n", "1", &ifname],
                EXEC_TIMEOUT,
            )
            .await
        })
    };
    let name = to_ns
        .file_name()
        .expect("netns file name")
        .to_string_lossy()
        .into_owned();
    let bound_if = ifname.to_string();
    tokio::task::spawn_blocking(move || {
        wait_for_can_listener(&name, &bound_if, Duration::from_secs(60))
    })
    .await
    .expect("listener check");
    exec(t, from, &["cansend", ifname, frame]).await;
    let out = listen.await.expect("listener task").expect("candump exec");
    assert_eq!(out.exit_code, 0, "candump: {}", out.stderr);
    let seen: Vec<&str> = out
        .stdout
        .lines()
        .filter_map(|l| l.split_once(") ").map(|(_, rest)| rest))
        .collect();
    assert_eq!(seen, [format!("{ifname} {frame}")], "{}", out.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the CAN test-bed VM"]
async fn faults_cost_running_pods_nothing_and_leave_nothing_behind() {
    require_testbed();
    let mut t = start_node().await;
    let empty = footprint(&t);

    kubelet_restarts_always_end_registered(&mut t).await;

    let steady = t.run_pod_ok(&sleeper("steady", 2, &[])).await;
    let m1 = t.run_pod_ok(&sleeper("m1", 0, &[BUS_PT])).await;
    let m2 = t.run_pod_ok(&sleeper("m2", 0, &[BUS_PT])).await;
    exec(
        &t,
        &steady,
        &["sh", "-c", "for i in 1 2 3; do cansend vcan0 123#11; done"],
    )
    .await;
    until("3 frames counted", Duration::from_secs(30), || {
        t.plugin.metric(TX_CLASSIC) == Some(3.0)
    })
    .await;

    an_empty_pod_listing_releases_nothing(&mut t, &steady, &m1, &m2).await;
    a_hung_or_restarted_containerd_releases_nothing(&mut t, &steady, &m1, &m2).await;
    a_plugin_killed_during_prestart_leaks_nothing(&mut t).await;
    pods_coming_and_going_leave_nothing_behind(&t).await;

    for pod in [&steady, &m1, &m2] {
        t.node.delete_pod(pod).await.expect("delete");
    }
    until("back to the empty node", RECONCILE * 2, || {
        footprint(&t) == empty
    })
    .await;
}

/// 50 kubelet restarts done like the kubelet, with 0–50 ms between its clean-up and its new
/// socket: each time all three resources register again, and each endpoint can be dialled.
async fn kubelet_restarts_always_end_registered(t: &mut TestNode) {
    let mut worst = Duration::ZERO;
    let mut total = Duration::ZERO;
    // A fixed sequence of pseudo-random gaps, so a failure can be replayed.
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    for round in 0..50 {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let gap = Duration::from_millis((seed >> 33) % 51);
        t.node
            .kubelet
            .restart_with_gap(gap)
            .await
            .expect("kubelet restart");
        let listening = Instant::now();
        let deadline = listening + Duration::from_secs(30);
        while !resources()
            .iter()
            .all(|(r, n)| t.node.kubelet.healthy_devices(r) == *n)
        {
            assert!(
                Instant::now() < deadline,
                "round {round} (gap {gap:?}): not all registered; plugin log:\n{}",
                t.plugin.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let took = listening.elapsed();
        worst = worst.max(took);
        total += took;
        for (resource, count) in resources() {
            let options = t
                .node
                .kubelet
                .dial(resource)
                .await
                .unwrap_or_else(|e| panic!("round {round}: {resource}: {e:#}"));
            assert!(options.pre_start_required);
            assert!(
                t.node.kubelet.is_registered(resource),
                "{resource}: {count}"
            );
        }
    }
    println!(
        "50 kubelet restarts: all three resources registered again after {:?} on average, {worst:?} at worst",
        total / 50
    );
    assert!(
        worst < Duration::from_secs(2),
        "a re-registration took {worst:?}"
    );
}

/// A kubelet restart whose PodResources lists nothing for 60 s: no interface, rule, namespace
/// or counter is lost, frames still cross the bus and counts continue exactly.
async fn an_empty_pod_listing_releases_nothing(
    t: &mut TestNode,
    steady: &StartedPod,
    m1: &StartedPod,
    m2: &StartedPod,
) {
    let before = footprint(t);
    let steady_links = links(&netns_of(t, steady).await);
    assert_eq!(steady_links, ["vcan0 vcan up=true", "vcan1 vcan up=true"]);
    t.node.kubelet.set_listing_empty(true);
    t.node.kubelet.restart().await.expect("kubelet restart");
    // Six reconcile passes see an empty listing.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(links(&netns_of(t, steady).await), steady_links);
    assert_eq!(footprint(t), before, "plugin log:\n{}", t.plugin.log());
    frame_crosses(t, m1, m2, "can0", "321#AB").await;
    exec(
        t,
        steady,
        &["sh", "-c", "for i in 1 2; do cansend vcan0 123#22; done"],
    )
    .await;
    until("5 frames counted", Duration::from_secs(30), || {
        t.plugin.metric(TX_CLASSIC) == Some(5.0)
    })
    .await;
    t.node.kubelet.set_listing_empty(false);
}

/// containerd frozen for 20 s (it accepts connections and never answers) while the plugin
/// restarts: the plugin registers anyway and adopts the pods once containerd answers; then a
/// containerd restart. Running pods keep everything and counts continue.
async fn a_hung_or_restarted_containerd_releases_nothing(
    t: &mut TestNode,
    steady: &StartedPod,
    m1: &StartedPod,
    m2: &StartedPod,
) {
    let before = footprint(t);
    let steady_ns = netns_of(t, steady).await;
    let steady_links = links(&steady_ns);
    let pid = t.containerd.pid().expect("containerd runs") as libc::pid_t;
    // SAFETY: signals to the test's own child process.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let frozen = Instant::now();
    t.plugin.restart().expect("plugin restart");
    for (resource, count) in resources() {
        let waited = t
            .node
            .kubelet
            .wait_for_resource(resource, count, Duration::from_secs(15))
            .await;
        if let Err(e) = waited {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGCONT) };
            panic!(
                "{e:#}: registration waited for a hung containerd\n{}",
                t.plugin.log()
            );
        }
    }
    println!(
        "registered {:?} after the restart with containerd frozen",
        frozen.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(frozen.elapsed())).await;
    assert_eq!(links(&steady_ns), steady_links, "while containerd hangs");
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    until("the pods adopted again", RECONCILE * 2, || {
        footprint(t) == before
    })
    .await;

    t.containerd.restart().await.expect("containerd restart");
    tokio::time::sleep(RECONCILE).await;
    assert_eq!(
        links(&steady_ns),
        steady_links,
        "after the containerd restart"
    );
    assert_eq!(footprint(t), before, "plugin log:\n{}", t.plugin.log());
    frame_crosses(t, m2, m1, "can0", "0AB#CD").await;
    exec(t, steady, &["cansend", "vcan0", "123#33"]).await;
    until("6 frames counted", Duration::from_secs(30), || {
        t.plugin.metric(TX_CLASSIC) == Some(6.0)
    })
    .await;
    sandbox_index_follows_the_restarted_containerd(t, &before).await;
}

/// The plugin started while containerd hung and containerd restarted since: the index of
/// sandboxes opened containerd's event stream again, listed the sandboxes again, and a pod
/// started now finds its namespace in memory rather than by asking the runtime.
async fn sandbox_index_follows_the_restarted_containerd(t: &TestNode, before: &Footprint) {
    const SYNCED: &str = "vcan_plugin_sandbox_index_synced";
    const RESYNCS: &str = "vcan_plugin_sandbox_index_resyncs_total";
    const FROM_INDEX: &str = "vcan_plugin_sandbox_lookups_total{source=\"index\"}";
    until(
        "the sandbox index follows containerd again",
        Duration::from_secs(30),
        || t.plugin.metric(SYNCED) == Some(1.0),
    )
    .await;
    let resyncs = t.plugin.metric(RESYNCS).expect("resync count");
    assert!(
        resyncs >= 2.0,
        "one listing at the plugin's start, one after containerd's restart: {resyncs}"
    );
    // Pods one after another, as a kubelet starts them: each PreStart finds its pod in the
    // listing made after its Allocate and the sandbox in memory, without asking anyone.
    let owners_remembered =
        format!("vcan_plugin_pod_lookups_total{{resource=\"{RESOURCE}\",source=\"memory\"}}");
    const BY_RECORD: &str = "vcan_plugin_sandbox_descriptions_total{source=\"record\"}";
    const BY_CRI: &str = "vcan_plugin_sandbox_descriptions_total{source=\"cri\"}";
    let (records, cri) = (
        t.plugin.metric(BY_RECORD).expect("description count"),
        t.plugin.metric(BY_CRI).expect("description count"),
    );
    for i in 0..3 {
        let hits = t.plugin.metric(FROM_INDEX).expect("lookup count");
        let owners = t.plugin.metric(&owners_remembered).unwrap_or(0.0);
        let fresh = t
            .run_pod_ok(&sleeper(&format!("after-containerd-{i}"), 2, &[]))
            .await;
        let now = t.plugin.metric(FROM_INDEX).expect("lookup count");
        assert_eq!(
            now,
            hits + 1.0,
            "pod {i}: the sandbox was not found in memory:\n{}",
            t.plugin.log()
        );
        let now = t
            .plugin
            .metric(&owners_remembered)
            .expect("pod lookup count");
        assert_eq!(
            now,
            owners + 1.0,
            "pod {i}: the pod was not found in the listing after its Allocate:\n{}",
            t.plugin.log()
        );
        t.node.delete_pod(&fresh).await.expect("delete");
    }
    // containerd's own record of each new sandbox described it; the CRI was not needed.
    let (records_now, cri_now) = (
        t.plugin.metric(BY_RECORD).expect("description count"),
        t.plugin.metric(BY_CRI).expect("description count"),
    );
    assert!(
        records_now >= records + 3.0 && cri_now == cri,
        "sandboxes described from records {records} -> {records_now}, by the CRI {cri} -> \
         {cri_now}:\n{}",
        t.plugin.log()
    );
    println!(
        "sandbox index: {resyncs} listings; three new pods' owners and namespaces found in memory"
    );
    until("the new pods released", RECONCILE * 2, || {
        footprint(t) == *before
    })
    .await;
}

/// The plugin SIGKILLed at different moments of a PreStart (a private pod with two vcans and a
/// bus member): the call either succeeded or failed with an error; the kubelet's retry after the
/// restart gives the pod its interfaces; deleting it leaves nothing.
async fn a_plugin_killed_during_prestart_leaks_nothing(t: &mut TestNode) {
    let before = footprint(t);
    for (i, delay_ms) in [0u64, 20, 60, 150].into_iter().enumerate() {
        let spec = sleeper(&format!("killed-{i}"), 2, &[BUS_BODY]);
        let (calls, sandbox) = admit_and_run_sandbox(t, &spec).await;
        let first = {
            let calls = calls.clone();
            let kubelet = &t.node.kubelet;
            async move {
                let mut results = Vec::new();
                for c in &calls {
                    results.push(
                        kubelet
                            .prestart(c)
                            .await
                            .map_err(|s| s.message().to_string()),
                    );
                }
                results
            }
        };
        let results = {
            let kill = async {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            };
            tokio::pin!(first);
            tokio::select! {
                results = &mut first => Some(results),
                () = kill => None,
            }
        };
        let registrations = t.node.kubelet.registrations();
        t.plugin.kill_and_restart().expect("kill and restart");
        println!("killed {delay_ms} ms into PreStart: {results:?}");
        // The new process registered every resource again (the old endpoints are dead).
        until("registered again", Duration::from_secs(30), || {
            t.node.kubelet.registrations() >= registrations + 3
                && resources()
                    .iter()
                    .all(|(r, n)| t.node.kubelet.healthy_devices(r) == *n)
        })
        .await;
        for c in &calls {
            t.node.kubelet.prestart(c).await.unwrap_or_else(|s| {
                panic!("retried PreStart: {}\n{}", s.message(), t.plugin.log())
            });
        }
        let ns = t
            .node
            .cri
            .netns_path(&sandbox)
            .await
            .expect("status")
            .expect("netns");
        assert_eq!(
            links(&ns),
            [
                "can1 vxcan up=true",
                "vcan0 vcan up=true",
                "vcan1 vcan up=true"
            ]
        );
        t.node.cri.remove_pod(&sandbox).await.expect("remove");
        t.node.kubelet.forget(&spec.namespace, &spec.name);
    }
    until(
        "nothing left of the killed PreStarts",
        RECONCILE * 2,
        || footprint(t) == before,
    )
    .await;
}

/// Many short-lived pods, each with two private vcans and a bus membership, five at once:
/// the node ends where it started. 100 in CI (about 2 s each under TCG);
/// `VCAN_TEST_FAULT_CYCLES=500 cargo xtask vm-test --timeout 3600 faults` runs more.
async fn pods_coming_and_going_leave_nothing_behind(t: &TestNode) {
    let cycles: usize = std::env::var("VCAN_TEST_FAULT_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let before = footprint(t);
    let started = Instant::now();
    let mut done = 0;
    while done < cycles {
        let batch: Vec<usize> = (done..cycles.min(done + 5)).collect();
        futures::future::join_all(batch.iter().map(|i| cycle(t, *i))).await;
        done += batch.len();
    }
    println!(
        "{cycles} pod create/delete cycles in {:?}",
        started.elapsed()
    );
    until("back to the starting footprint", RECONCILE * 2, || {
        footprint(t) == before
    })
    .await;
}

/// Admits `spec` (two private vcans and a body-bus membership in container `app`) and runs its
/// sandbox; returns the PreStart calls the kubelet would make and the sandbox ID.
async fn admit_and_run_sandbox(t: &TestNode, spec: &PodSpec) -> (Vec<ContainerAllocation>, String) {
    let allocation = t
        .node
        .kubelet
        .admit(
            &spec.namespace,
            &spec.name,
            &[
                ("app".into(), RESOURCE.into(), 2),
                ("app".into(), BUS_BODY.into(), 1),
            ],
        )
        .await
        .unwrap_or_else(|e| panic!("{}: admit: {e:#}", spec.name));
    let sandbox = t
        .node
        .cri
        .run_sandbox(spec)
        .await
        .unwrap_or_else(|e| panic!("{}: sandbox: {e:#}", spec.name));
    (allocation.containers, sandbox)
}

/// One pod as the kubelet runs it up to its containers: admission, sandbox, PreStart for each
/// resource; then its deletion.
async fn cycle(t: &TestNode, i: usize) {
    let spec = sleeper(&format!("cycle-{i}"), 2, &[BUS_BODY]);
    let (calls, sandbox) = admit_and_run_sandbox(t, &spec).await;
    for c in &calls {
        t.node
            .kubelet
            .prestart(c)
            .await
            .unwrap_or_else(|s| panic!("cycle {i}: PreStart: {}\n{}", s.message(), t.plugin.log()));
    }
    t.node
        .cri
        .remove_pod(&sandbox)
        .await
        .unwrap_or_else(|e| panic!("cycle {i}: remove: {e:#}"));
    t.node.kubelet.forget(&spec.namespace, &spec.name);
}
