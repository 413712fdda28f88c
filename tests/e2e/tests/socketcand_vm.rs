//! A bus's socketcand endpoint with real clients: python-can 4.6's `socketcand` interface (from
//! PyPI, prepared by `cargo xtask vm-test` in `target/python-can-venv`) and member pods running
//! can-utils, on a real node in the CAN test-bed VM. Malformed input, a client that stops
//! reading and more clients than allowed are sent over plain TCP, as any tool could.
//!
//! Listeners are `candump -n N` in the member pods and python-can clients counting frames; each
//! scenario ends with a marker frame, so a frame arriving twice would push the marker out of the
//! first N.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use vcan_e2e::env::TestNode;
use vcan_e2e::images::CANUTILS_IMAGE;
use vcan_e2e::node::StartedPod;
use vcan_e2e::wait::eventually;
use vcan_e2e::{ContainerSpec, PodSpec};
use vcan_test_support::{require_testbed, run_in_netns, wait_for_can_listener};

const STATE_DIR: &str = "/run/vcan-node/state";
const BUS: &str = "socketcan.io/bus-eng";
const ENDPOINT: &str = "127.0.0.1:29536";
const MAX_CLIENTS: usize = 3;
const BIND_TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_TIMEOUT: Duration = Duration::from_secs(150);
const EXEC_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a listener waits for its frames before failing the test (seconds).
const DUMP_TIMEOUT: &str = "150";

fn bus_config() -> PathBuf {
    let path = PathBuf::from("/run/vcan-node/socketcand-buses.json");
    std::fs::create_dir_all("/run/vcan-node").expect("node dir");
    std::fs::write(
        &path,
        format!(
            r#"{{"buses": [{{"name": "eng", "fd": false, "members": 4,
                "socketcand": {{"port": 29536, "max_clients": {MAX_CLIENTS}}}}}]}}"#
        ),
    )
    .expect("write bus config");
    path
}

/// A member pod dumping the first `frames` frames of can0 that pass `filter` (candump's
/// `can0,ID:MASK` syntax, or plain `can0`), then lingering so that cansends exec'd into it finish.
fn listener(name: &str, frames: usize, filter: &str) -> PodSpec {
    let script =
        format!("timeout {DUMP_TIMEOUT} candump -L -n {frames} {filter}; rc=$?; sleep 3; exit $rc");
    let mut c = ContainerSpec::new("app", CANUTILS_IMAGE, ["sh", "-c", &script]);
    c.resources = vec![(BUS.to_string(), 1)];
    let mut p = PodSpec::new("default", name);
    p.containers = vec![c];
    p
}

async fn wait_bound(t: &TestNode, pod: &StartedPod) {
    let ns = t.netns_name(pod).await;
    tokio::task::spawn_blocking(move || wait_for_can_listener(&ns, "can0", BIND_TIMEOUT))
        .await
        .expect("wait for listener");
}

/// Like [`wait_bound`] for a listener with a filter for one identifier, which the kernel lists
/// among the filtered receivers (or those of single ids, by mask).
async fn wait_bound_to_one_id(t: &TestNode, pod: &StartedPod) {
    let ns = t.netns_name(pod).await;
    eventually("the filtered listener binds", BIND_TIMEOUT, || {
        let out = run_in_netns(
            &ns,
            "cat",
            &["/proc/net/can/rcvlist_fil", "/proc/net/can/rcvlist_sff"],
        );
        let listing = String::from_utf8_lossy(&out.stdout).into_owned();
        if listing
            .lines()
            .any(|l| l.split_whitespace().next() == Some("can0"))
        {
            Ok(())
        } else {
            Err(listing)
        }
    })
    .await;
}

async fn exec_ok(t: &TestNode, pod: &StartedPod, cmd: &[&str]) {
    let out = t
        .node
        .cri
        .exec(pod.container("app"), cmd, EXEC_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("exec in {}: {e:#}", pod.spec.name));
    assert_eq!(
        out.exit_code, 0,
        "{cmd:?} in {}: {}{}",
        pod.spec.name, out.stdout, out.stderr
    );
}

/// The frames a listener pod dumped (`ID#DATA`), once it has exited.
async fn dumped(t: &TestNode, pod: &StartedPod) -> Vec<String> {
    let code = t
        .node
        .cri
        .wait_exit(pod.container("app"), EXIT_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{}: {e:#}", pod.spec.name));
    let log = t.node.cri.logs(&pod.spec, "app").await.expect("logs");
    let frames: Vec<String> = log
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_string))
        .collect();
    assert_eq!(
        code, 0,
        "{} did not receive all its frames; got {frames:?}",
        pod.spec.name
    );
    frames
}

fn python() -> PathBuf {
    let python =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/python-can-venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: `cargo xtask vm-test` installs python-can there before the VM boots",
        python.display()
    );
    python
}

/// A python-can client receiving `count` frames, started and past its handshake.
struct PyClient {
    child: Child,
    stdout: std::io::BufReader<ChildStdout>,
}

impl PyClient {
    fn start(count: usize, send: &[&str]) -> PyClient {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/socketcand_client.py");
        let (host, port) = ENDPOINT.split_once(':').expect("host:port");
        let mut cmd = Command::new(python());
        cmd.arg(script)
            .args(["recv", "--host", host, "--port", port, "--channel", "can0"])
            .args(["--count", &count.to_string(), "--timeout", "120"]);
        for frame in send {
            cmd.args(["--send", frame]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python-can client starts");
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut line).expect("client output");
        assert_eq!(
            line.trim(),
            "ready",
            "python-can's handshake with the endpoint"
        );
        PyClient { child, stdout }
    }

    /// The frames it received, once it has them all.
    fn frames(mut self) -> Vec<String> {
        let mut out = String::new();
        self.stdout.read_to_string(&mut out).expect("client output");
        let status = self.child.wait().expect("client exits");
        let frames: Vec<String> = out.lines().map(str::to_string).collect();
        assert!(
            status.success(),
            "python-can client: {status}, received {frames:?}"
        );
        frames
    }
}

/// `frames` of one sender, those whose id is `id`, in the order received.
fn from(frames: &[String], id: &str) -> Vec<String> {
    frames
        .iter()
        .filter(|f| f.split('#').next() == Some(id))
        .cloned()
        .collect()
}

fn metric(t: &TestNode, series: &str) -> f64 {
    t.plugin.metric(series).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the CAN test-bed VM"]
async fn python_can_clients_see_and_send_on_the_bus() {
    require_testbed();
    let config = bus_config();
    let t = TestNode::start_with(
        2,
        "127.0.0.1:9727",
        vec![
            "--bus-config".into(),
            config.display().to_string(),
            "--state-dir".into(),
            STATE_DIR.into(),
        ],
        &[(BUS, 4)],
    )
    .await
    .expect("node starts");

    two_members_and_two_clients_hear_each_other_once(&t).await;
    bad_input_is_answered_and_the_endpoint_keeps_serving(&t).await;
    more_clients_than_allowed_are_told_so(&t).await;
    a_client_that_stops_reading_is_dropped_while_members_talk(&t).await;
    println!("plugin log tail:\n{}", tail(&t.plugin.log(), 15));
}

/// Members M1 and M2 send two frames each, client A (python-can) two; client B (python-can)
/// only listens. Every frame reaches everyone but its sender exactly once, in its sender's order
/// (candump also shows a member its own frames); M1's marker ends every listener's list.
async fn two_members_and_two_clients_hear_each_other_once(t: &TestNode) {
    const MARKER: &str = "7FF#EE";
    let m1_frames = ["101#01", "101#0202"];
    let m2_frames = ["202#", "202#0303030303030303"];
    let a_frames = ["321#A1", "1ABCDEF0#A2A2"];
    // Members: 2 own + 2 other member + 2 of A + marker.
    let m1 = t.run_pod_ok(&listener("m1", 7, "can0")).await;
    let m2 = t.run_pod_ok(&listener("m2", 7, "can0")).await;
    wait_bound(t, &m1).await;
    wait_bound(t, &m2).await;
    let endpoint_connected = || async {
        eventually(
            "the endpoint joins the bus",
            Duration::from_secs(30),
            || {
                if t.plugin
                    .log()
                    .contains("socketcand endpoint connected to the bus")
                {
                    Ok(())
                } else {
                    Err("not yet".to_string())
                }
            },
        )
        .await;
    };
    endpoint_connected().await;

    let b = tokio::task::spawn_blocking(|| PyClient::start(7, &[]))
        .await
        .expect("client B");
    let a = tokio::task::spawn_blocking(move || PyClient::start(5, &a_frames))
        .await
        .expect("client A");
    eventually("A's frames reach the bus", Duration::from_secs(30), || {
        let n = metric(
            t,
            "vcan_plugin_socketcand_frames_total{bus=\"eng\",direction=\"from_clients\"}",
        );
        if n >= 2.0 {
            Ok(())
        } else {
            Err(format!("{n}"))
        }
    })
    .await;
    assert_eq!(
        metric(t, "vcan_plugin_socketcand_clients{bus=\"eng\"}"),
        2.0
    );
    for f in m1_frames {
        exec_ok(t, &m1, &["cansend", "can0", f]).await;
    }
    for f in m2_frames {
        exec_ok(t, &m2, &["cansend", "can0", f]).await;
    }
    exec_ok(t, &m1, &["cansend", "can0", MARKER]).await;

    let a_got = tokio::task::spawn_blocking(move || a.frames())
        .await
        .expect("A");
    let b_got = tokio::task::spawn_blocking(move || b.frames())
        .await
        .expect("B");
    let (m1_got, m2_got) = (dumped(t, &m1).await, dumped(t, &m2).await);
    println!("client A received {a_got:?}");
    println!("client B received {b_got:?}");
    println!("m1 received {m1_got:?}");
    println!("m2 received {m2_got:?}");
    for (who, got, expected) in [
        ("A", &a_got, 5),
        ("B", &b_got, 7),
        ("m1", &m1_got, 7),
        ("m2", &m2_got, 7),
    ] {
        assert_eq!(got.len(), expected, "{who}: {got:?}");
        assert_eq!(
            got.last().map(String::as_str),
            Some(MARKER),
            "{who}: {got:?}"
        );
        assert_eq!(from(got, "101"), m1_frames, "{who}: M1's frames");
        assert_eq!(from(got, "202"), m2_frames, "{who}: M2's frames");
    }
    // A never gets its own frames back; B and both members get them once, in order.
    assert_eq!(from(&a_got, "321"), Vec::<String>::new());
    for (who, got) in [("B", &b_got), ("m1", &m1_got), ("m2", &m2_got)] {
        assert_eq!(from(got, "321"), [a_frames[0]], "{who}");
        assert_eq!(from(got, "1ABCDEF0"), [a_frames[1]], "{who}");
    }
    // Deliveries: A got 5 frames, B 7.
    eventually("the counts settle", Duration::from_secs(10), || {
        let to = metric(
            t,
            "vcan_plugin_socketcand_frames_total{bus=\"eng\",direction=\"to_clients\"}",
        );
        let clients = metric(t, "vcan_plugin_socketcand_clients{bus=\"eng\"}");
        if to == 12.0 && clients == 0.0 {
            Ok(())
        } else {
            Err(format!("to_clients {to}, clients {clients}"))
        }
    })
    .await;
    assert_eq!(
        metric(
            t,
            "vcan_plugin_socketcand_frames_total{bus=\"eng\",direction=\"from_clients\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            t,
            "vcan_plugin_socketcand_disconnects_total{bus=\"eng\",reason=\"closed\"}"
        ),
        2.0
    );
    println!(
        "two members and two python-can clients: every frame once, in order, never back to its sender"
    );
    t.node.delete_pod(&m1).await.expect("delete m1");
    t.node.delete_pod(&m2).await.expect("delete m2");
}

/// A raw TCP client of the endpoint.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    fn connect() -> Raw {
        let stream = TcpStream::connect(ENDPOINT).expect("connect to the endpoint");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut raw = Raw {
            stream,
            buf: Vec::new(),
        };
        assert_eq!(raw.reply(), "< hi >");
        raw
    }

    fn send(&mut self, text: &str) {
        self.stream.write_all(text.as_bytes()).expect("write");
    }

    /// The next `< ... >` the endpoint sent.
    fn reply(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'>') {
                let reply: Vec<u8> = self.buf.drain(..=end).collect();
                return String::from_utf8_lossy(&reply).trim().to_string();
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).expect("a reply");
            assert!(
                n > 0,
                "closed while waiting for a reply; had {:?}",
                self.buf
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Whether the endpoint closes the connection (after whatever else it sends).
    fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

/// Malformed commands get an error each and the session goes on; a wrong bus and an endless line
/// end the connection; the endpoint serves the next client all the same.
async fn bad_input_is_answered_and_the_endpoint_keeps_serving(t: &TestNode) {
    let errors_before = metric(
        t,
        "vcan_plugin_socketcand_protocol_errors_total{bus=\"eng\",kind=\"bad_arguments\"}",
    );
    tokio::task::spawn_blocking(|| {
        let mut c = Raw::connect();
        c.send("< open powertrain >");
        let reply = c.reply();
        assert!(
            reply.starts_with("< error could not open bus 'powertrain'"),
            "{reply}"
        );
        assert!(c.closed(), "a wrong bus ends the connection");

        let mut c = Raw::connect();
        c.send("< rawmode >");
        let reply = c.reply();
        assert!(reply.starts_with("< error no bus is open"), "{reply}");
        c.send("< open eng >");
        assert_eq!(c.reply(), "< ok >");
        c.send("< rawmode >");
        assert_eq!(c.reply(), "< ok >");
        for bad in [
            "< send 800 1 01 >",
            "< send 123 9 1 2 3 4 5 6 7 8 9 >",
            "< send 123 2 01 >",
            "< fly me to the moon >",
            "junk",
            "< add 1 0 123 8 11 22 33 44 55 66 77 88 >",
        ] {
            c.send(bad);
            let reply = c.reply();
            assert!(reply.starts_with("< error "), "{bad} → {reply}");
            println!("{bad:?} → {reply:?}");
        }
        c.send("<echo>");
        assert_eq!(c.reply(), "< echo >", "the session goes on after errors");
        c.send(&format!("< send 123 1 {}", "0 ".repeat(50_000)));
        let reply = c.reply();
        assert!(reply.starts_with("< error "), "endless line → {reply}");
        assert!(c.closed(), "an endless line ends the connection");
        println!("endless line → {reply:?}, closed");

        let c = Raw::connect();
        drop(c);
    })
    .await
    .expect("bad input");
    assert!(
        metric(
            t,
            "vcan_plugin_socketcand_protocol_errors_total{bus=\"eng\",kind=\"bad_arguments\"}"
        ) >= errors_before + 3.0
    );
    for kind in [
        "too_long",
        "unknown_command",
        "unframed",
        "unsupported",
        "wrong_bus",
    ] {
        let n = metric(
            t,
            &format!("vcan_plugin_socketcand_protocol_errors_total{{bus=\"eng\",kind=\"{kind}\"}}"),
        );
        assert!(n >= 1.0, "protocol errors of kind {kind}: {n}");
    }
    let (status, _) = t
        .plugin
        .http_get("/healthz")
        .expect("the plugin survives bad input");
    assert_eq!(status, 200);
}

/// With `MAX_CLIENTS` connected, the next client is told why and closed; once one leaves, a
/// new one is served.
async fn more_clients_than_allowed_are_told_so(t: &TestNode) {
    let refused_before = metric(
        t,
        "vcan_plugin_socketcand_connections_total{bus=\"eng\",result=\"refused\"}",
    );
    tokio::task::spawn_blocking(|| {
        let mut held: Vec<Raw> = (0..MAX_CLIENTS).map(|_| Raw::connect()).collect();
        let mut extra = TcpStream::connect(ENDPOINT).expect("connect");
        extra
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut text = String::new();
        extra
            .read_to_string(&mut text)
            .expect("refusal, then close");
        assert!(
            text.starts_with("< error too many clients: this endpoint serves at most 3"),
            "{text}"
        );
        println!("client {} refused: {text}", MAX_CLIENTS + 1);
        held.pop();
        // The endpoint notices the close before it admits the next one.
        std::thread::sleep(Duration::from_millis(500));
        let mut again = Raw::connect();
        again.send("< open can0 >");
        assert_eq!(again.reply(), "< ok >");
    })
    .await
    .expect("client limit");
    assert_eq!(
        metric(
            t,
            "vcan_plugin_socketcand_connections_total{bus=\"eng\",result=\"refused\"}"
        ),
        refused_before + 1.0
    );
}

/// A client in raw mode that never reads while a member floods the bus is disconnected; the
/// members keep talking meanwhile (M2 gets M1's marker sent after the flood).
async fn a_client_that_stops_reading_is_dropped_while_members_talk(t: &TestNode) {
    let m1 = t.run_pod_ok(&listener("f1", 1, "can0,7FE:7FF")).await;
    let m2 = t.run_pod_ok(&listener("f2", 1, "can0,7FE:7FF")).await;
    wait_bound_to_one_id(t, &m2).await;
    let stalled = tokio::task::spawn_blocking(|| {
        let mut c = Raw::connect();
        c.send("< open can0 >");
        assert_eq!(c.reply(), "< ok >");
        c.send("< rawmode >");
        assert_eq!(c.reply(), "< ok >");
        c
    })
    .await
    .expect("stalled client");
    exec_ok(
        t,
        &m1,
        &[
            "cangen", "can0", "-g", "0", "-n", "30000", "-I", "100", "-L", "8", "-D", "i", "-p",
            "5",
        ],
    )
    .await;
    eventually(
        "the stalled client is dropped",
        Duration::from_secs(60),
        || {
            let n = metric(
                t,
                "vcan_plugin_socketcand_disconnects_total{bus=\"eng\",reason=\"slow_client\"}",
            );
            if n == 1.0 {
                Ok(())
            } else {
                Err(format!("{n}"))
            }
        },
    )
    .await;
    exec_ok(t, &m1, &["cansend", "can0", "7FE#01"]).await;
    assert_eq!(dumped(t, &m2).await, ["7FE#01"]);
    let delivered = metric(
        t,
        "vcan_plugin_socketcand_frames_total{bus=\"eng\",direction=\"to_clients\"}",
    );
    println!(
        "a client that stopped reading was dropped after {delivered} deliveries in all; the members kept talking"
    );
    drop(stalled);
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
