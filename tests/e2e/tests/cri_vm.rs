//! The end-to-end harness itself, against containerd's CRI service in the test-bed VM: pods run
//! from the locally built images, get their own network namespace, carry CAN frames on a vcan
//! created from outside, survive a containerd restart and leave nothing behind when removed.
//!
//! Each test starts its own containerd; `Containerd::start` makes them take turns.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vcan_e2e::images::CANUTILS_IMAGE;
use vcan_e2e::{ContainerSpec, Containerd, ContainerdOptions, Cri, PodSpec};
use vcan_plugin::api::cri::v1::{ContainerState, PodSandboxState};
use vcan_test_support::{IP, require_testbed, wait_for_can_listener};

/// Generous: under TCG a container start takes seconds and a listener can take seconds to bind.
const CONTAINER_TIMEOUT: Duration = Duration::from_secs(90);
const BIND_TIMEOUT: Duration = Duration::from_secs(30);
const EXEC_TIMEOUT: Duration = Duration::from_secs(30);

/// The frame sent, in cansend's syntax, and as `candump -L` prints it.
const FRAME: &str = "5A1#11.2233.44556677.88";
const FRAME_LOGGED: &str = "5A1#1122334455667788";

/// Unwraps an anyhow result, panicking with the whole error chain.
fn ok<T>(result: anyhow::Result<T>, what: &str) -> T {
    result.unwrap_or_else(|err| panic!("{what}: {err:#}"))
}

/// Prints how long a step took (visible with `--nocapture`), and restarts the clock.
fn lap(clock: &mut Instant, step: &str) {
    eprintln!("[e2e] {step}: {:.2} s", clock.elapsed().as_secs_f64());
    *clock = Instant::now();
}

/// Starts containerd and prints its start-up times (the clock also ran while this test waited
/// for the other one's containerd to go).
async fn start_containerd(clock: &mut Instant) -> Containerd {
    let containerd = ok(
        Containerd::start(ContainerdOptions::default()).await,
        "starting containerd",
    );
    let startup = containerd.startup();
    eprintln!(
        "[e2e] containerd ready after {:.2} s, images imported in {:.2} s",
        startup.ready.as_secs_f64(),
        startup.images.as_secs_f64()
    );
    lap(clock, "containerd started (with any wait for its turn)");
    containerd
}

fn netns_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| panic!("netns path {} has no file name", path.display()))
}

/// The sandbox's network namespace, which must be one the CNI plugin made.
async fn pod_netns(cri: &Cri, sandbox: &str) -> PathBuf {
    let netns = ok(cri.netns_path(sandbox).await, "netns path")
        .unwrap_or_else(|| panic!("sandbox {sandbox} of a pod network has no netns path"));
    assert!(
        netns_name(&netns).starts_with("cni-")
            && netns.parent() == Some(Path::new("/var/run/netns")),
        "unexpected netns path {}",
        netns.display()
    );
    assert!(netns.exists(), "{} does not exist", netns.display());
    netns
}

/// Runs iproute2's `ip` on the host side of the guest; panics unless it succeeds.
fn ip(args: &[&str]) -> String {
    let out = Command::new(IP)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {IP}: {e}"));
    assert!(
        out.status.success(),
        "ip {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs container `name` of `pod` to completion and returns its output; panics unless it
/// exits 0.
async fn run_to_completion(cri: &Cri, sandbox: &str, pod: &PodSpec, name: &str) -> String {
    let spec = pod.container(name).expect("container in the pod spec");
    let id = ok(
        cri.create_and_start(sandbox, pod, spec, &HashMap::new())
            .await,
        "create and start",
    );
    let code = ok(cri.wait_exit(&id, CONTAINER_TIMEOUT).await, "wait for exit");
    let logs = ok(cri.logs(pod, name).await, "logs");
    assert_eq!(
        code, 0,
        "container {name} exited with {code}; output:\n{logs}"
    );
    logs
}

#[tokio::test]
#[ignore = "needs the CAN test-bed VM"]
async fn a_pod_shows_its_links_and_receives_a_can_frame() {
    require_testbed();
    let mut clock = Instant::now();
    let containerd = start_containerd(&mut clock).await;
    let cri = ok(Cri::connect(containerd.socket()).await, "connect");

    let mut pod = PodSpec::new("e2e", "canutils");
    pod.containers.push(ContainerSpec::new(
        "show",
        CANUTILS_IMAGE,
        ["sh", "-c", "ip -details link; echo hello"],
    ));
    // busybox's timeout bounds the listener even if the frame never comes.
    pod.containers.push(ContainerSpec::new(
        "dump",
        CANUTILS_IMAGE,
        ["timeout", "60", "candump", "-L", "-n", "1", "vcan0"],
    ));
    pod.containers.push(ContainerSpec::new(
        "send",
        CANUTILS_IMAGE,
        ["cansend", "vcan0", FRAME],
    ));
    let sandbox = ok(cri.run_sandbox(&pod).await, "run sandbox");
    lap(&mut clock, "RunPodSandbox");
    let netns = pod_netns(&cri, &sandbox).await;
    let ns = netns_name(&netns);

    // Created from outside, as the device plugin does, before the containers start.
    ip(&["-n", &ns, "link", "add", "vcan0", "type", "vcan"]);
    ip(&["-n", &ns, "link", "set", "vcan0", "up"]);

    let shown = run_to_completion(&cri, &sandbox, &pod, "show").await;
    lap(&mut clock, "container `show` ran");
    assert!(shown.ends_with("hello\n"), "{shown}");
    assert!(shown.contains("lo: <LOOPBACK"), "{shown}");
    // iproute2's ip (not busybox's applet): CAN details of the vcan.
    assert!(shown.contains("vcan0: <NOARP,UP,LOWER_UP>"), "{shown}");
    assert!(shown.contains("link/can"), "{shown}");
    // The CNI bridge network's interface.
    assert!(shown.contains("eth0@"), "{shown}");

    let spec = pod.container("dump").expect("dump container");
    let dump = ok(
        cri.create_and_start(&sandbox, &pod, spec, &HashMap::new())
            .await,
        "start candump",
    );
    let listener_ns = ns.clone();
    tokio::task::spawn_blocking(move || {
        wait_for_can_listener(&listener_ns, "vcan0", BIND_TIMEOUT);
    })
    .await
    .expect("candump binds");
    lap(&mut clock, "candump listening");
    // A container of its own: a cansend exec'd into the candump container could be killed by
    // the runtime when candump, its init, exits on the frame before cansend has exited.
    run_to_completion(&cri, &sandbox, &pod, "send").await;
    let code = ok(
        cri.wait_exit(&dump, CONTAINER_TIMEOUT).await,
        "candump exit",
    );
    let dumped = ok(cri.logs(&pod, "dump").await, "candump logs");
    assert_eq!(code, 0, "candump exited with {code}: {dumped}");
    lap(&mut clock, "frame received");
    let lines: Vec<&str> = dumped.lines().collect();
    assert_eq!(lines.len(), 1, "{dumped}");
    // `(<time>) vcan0 5A1#1122334455667788`
    let fields: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        fields.get(1..),
        Some(&["vcan0", FRAME_LOGGED][..]),
        "{dumped}"
    );

    ok(cri.remove_pod(&sandbox).await, "remove pod");
    lap(&mut clock, "pod removed");
    assert!(!netns.exists(), "{} outlived its pod", netns.display());
    ok(containerd.stop().await, "stop containerd");
    lap(&mut clock, "containerd stopped");
}

#[tokio::test]
#[ignore = "needs the CAN test-bed VM"]
async fn pods_survive_a_containerd_restart() {
    require_testbed();
    let mut clock = Instant::now();
    let mut containerd = start_containerd(&mut clock).await;
    let cri = ok(Cri::connect(containerd.socket()).await, "connect");

    let mut before = PodSpec::new("e2e", "before-restart");
    before.containers.push(ContainerSpec::new(
        "sleeper",
        CANUTILS_IMAGE,
        ["sleep", "3600"],
    ));
    let sandbox1 = ok(cri.run_sandbox(&before).await, "run sandbox");
    let sleeper = ok(
        cri.create_and_start(&sandbox1, &before, &before.containers[0], &HashMap::new())
            .await,
        "start sleeper",
    );
    let netns1 = pod_netns(&cri, &sandbox1).await;
    lap(&mut clock, "first pod running");

    let pid = containerd.pid();
    ok(containerd.restart().await, "restart containerd");
    assert_ne!(containerd.pid(), pid, "a new containerd process");
    lap(&mut clock, "containerd restarted");

    let cri = ok(Cri::connect(containerd.socket()).await, "reconnect");
    let state = ok(cri.sandbox_status(&sandbox1).await, "sandbox status").state();
    assert_eq!(state, PodSandboxState::SandboxReady);
    let state = ok(cri.container_status(&sleeper).await, "container status").state();
    assert_eq!(state, ContainerState::ContainerRunning);
    let out = ok(
        cri.exec(&sleeper, &["echo", "still here"], EXEC_TIMEOUT)
            .await,
        "exec after restart",
    );
    assert_eq!(
        (out.exit_code, out.stdout.as_str()),
        (0, "still here\n"),
        "{out:?}"
    );
    assert_eq!(
        ok(cri.netns_path(&sandbox1).await, "netns after restart").as_deref(),
        Some(netns1.as_path())
    );

    let mut after = PodSpec::new("e2e", "after-restart");
    after.containers.push(ContainerSpec::new(
        "once",
        CANUTILS_IMAGE,
        ["sh", "-c", "echo after restart"],
    ));
    let sandbox2 = ok(cri.run_sandbox(&after).await, "run sandbox after restart");
    let netns2 = pod_netns(&cri, &sandbox2).await;
    assert_ne!(netns1, netns2);
    let out = run_to_completion(&cri, &sandbox2, &after, "once").await;
    assert_eq!(out, "after restart\n");
    lap(&mut clock, "second pod ran");

    for (sandbox, netns) in [(&sandbox1, &netns1), (&sandbox2, &netns2)] {
        ok(cri.remove_pod(sandbox).await, "remove pod");
        assert!(!netns.exists(), "{} outlived its pod", netns.display());
    }
    lap(&mut clock, "pods removed");
    ok(containerd.stop().await, "stop containerd");
}
