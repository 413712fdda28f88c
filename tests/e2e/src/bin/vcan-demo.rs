//! The demo node: containerd, vcan-plugin and the kubelet stand-in, running the example pod with
//! two vcan interfaces. Runs inside the CAN test-bed VM (`cargo xtask demo`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use vcan_e2e::env::{RESOURCE, TestNode};
use vcan_e2e::images::CANUTILS_IMAGE;
use vcan_e2e::{ContainerSpec, PodSpec};

const FRAME: &str = "5A1#11.2233.44556677.88";
/// How commands run in the pod's container are labelled.
const IN_POD: &str = "[in pod can-demo]";

fn step(started: Instant, what: &str) {
    println!("[{:6.1} s] {what}", started.elapsed().as_secs_f64());
}

/// A command line as sh would read it, each argument quoted where needed.
fn shell_line(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%#".contains(&b))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let started = Instant::now();
    step(
        started,
        "starting containerd, the kubelet stand-in and vcan-plugin",
    );
    let t = TestNode::start(100, "127.0.0.1:9720").await?;
    step(
        started,
        &format!(
            "vcan-plugin registered {RESOURCE} with the kubelet: {} healthy devices",
            t.node.kubelet.healthy_devices(RESOURCE)
        ),
    );

    // The example pod of deploy/examples/can-pod.yaml: two interfaces, can-utils inside.
    let mut app = ContainerSpec::new("can", CANUTILS_IMAGE, ["sleep", "3600"]);
    app.vcan = 2;
    let mut spec = PodSpec::new("default", "can-demo");
    spec.containers = vec![app];
    step(
        started,
        "running pod default/can-demo requesting socketcan.io/vcan: 2",
    );
    let pod = t.node.run_pod(&spec).await?;
    if let Some(failure) = &pod.failure {
        bail!(
            "the pod failed to start: {failure}\nplugin log:\n{}",
            t.plugin.log()
        );
    }
    step(
        started,
        &format!("pod running; PreStartContainer took {:?}", pod.prestart),
    );

    let container = pod.container("can").to_string();
    let exec = |cmd: Vec<String>| {
        let cri = &t.node.cri;
        let container = container.clone();
        async move {
            let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
            cri.exec(&container, &args, Duration::from_secs(60)).await
        }
    };
    // Runs a command in the container and shows it first, exactly as it runs.
    let shown = |cmd: Vec<String>| {
        println!("{IN_POD} $ {}", shell_line(&cmd));
        exec(cmd)
    };
    println!(
        "\nLines marked {IN_POD} are commands run in the pod's container \"can\" through \
         containerd's CRI ExecSync call; no kubectl or API server is involved.\n"
    );

    let env = shown(vec![
        "sh".into(),
        "-c".into(),
        "echo $VCAN_INTERFACES".into(),
    ])
    .await?;
    println!("{}", env.stdout);
    let links = shown(vec!["ip".into(), "-details".into(), "link".into()]).await?;
    println!("{}", links.stdout);

    // candump in the background inside the pod; cansend once it is listening.
    let listen = "timeout 60 candump -L -n 1 vcan0 > /tmp/candump.log 2>&1 &";
    shown(vec!["sh".into(), "-c".into(), listen.into()]).await?;
    let wait = "for i in $(seq 600); do grep -q '^ *vcan0 ' /proc/net/can/rcvlist_all && exit 0; \
                sleep 0.1; done; exit 1";
    if exec(vec!["sh".into(), "-c".into(), wait.into()])
        .await?
        .exit_code
        != 0
    {
        bail!("candump never started listening on vcan0");
    }
    let sent = shown(vec!["cansend".into(), "vcan0".into(), FRAME.into()]).await?;
    if sent.exit_code != 0 {
        bail!("cansend failed: {}", sent.stderr);
    }
    let mut heard = String::new();
    for _ in 0..100 {
        heard = exec(vec!["cat".into(), "/tmp/candump.log".into()])
            .await?
            .stdout;
        if !heard.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("{IN_POD} $ cat /tmp/candump.log\n{heard}");
    if !heard.contains("vcan0 5A1#1122334455667788") {
        bail!("candump did not receive the frame: {heard:?}");
    }
    step(started, "candump received exactly the frame cansend sent");

    let (_, metrics) = t
        .plugin
        .http_get("/metrics")
        .context("scraping the plugin")?;
    println!(
        "\n[on the node] GET http://127.0.0.1:9720/metrics, the non-zero series with pod=\"can-demo\":"
    );
    for line in metrics
        .lines()
        .filter(|l| l.contains("pod=\"can-demo\"") && !l.ends_with(" 0"))
    {
        println!("{line}");
    }

    step(started, "deleting the pod and stopping the node");
    t.node.delete_pod(&pod).await?;
    drop(t);
    step(started, "demo finished");
    Ok(())
}
