//! PreStartContainer latency on a real node (containerd, kubelet stand-in, vcan-plugin), in the
//! CAN test-bed VM: pods started one after another, then many at once. `cargo xtask bench`.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use vcan_e2e::env::TestNode;
use vcan_e2e::images::CANUTILS_IMAGE;
use vcan_e2e::node::StartedPod;
use vcan_e2e::{ContainerSpec, PodSpec};

struct Args {
    sequential: usize,
    concurrent: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        sequential: 100,
        concurrent: 50,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_default();
        let n: usize = match value.parse() {
            Ok(n) => n,
            Err(_) => bail!("{flag} needs a number, got {value:?}"),
        };
        match flag.as_str() {
            "--sequential" => args.sequential = n,
            "--concurrent" => args.concurrent = n,
            other => bail!("unknown argument {other}; use --sequential N --concurrent M"),
        }
    }
    Ok(args)
}

fn spec(name: String) -> PodSpec {
    let mut c = ContainerSpec::new("app", CANUTILS_IMAGE, ["sleep", "3600"]);
    c.vcan = 2;
    let mut p = PodSpec::new("bench", &name);
    p.containers = vec![c];
    p
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn report(label: &str, mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let (p50, p99) = (percentile(&samples, 50.0), percentile(&samples, 99.0));
    println!(
        "{label}: n={} p50={:.2} ms p99={:.2} ms max={:.2} ms",
        samples.len(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        samples.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    (p50, p99)
}

/// The phases the plugin logs for each PreStart, as `name=<Debug duration>`.
const PHASES: [&str; 5] = [
    "pod_lookup",
    "namespace_lookup",
    "link_creation",
    "bpf_attach",
    "elapsed",
];

/// Parses a `Duration`'s Debug form (`59.87669ms`, `850µs`, `1.2s`, `120ns`).
fn parse_debug_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (value, unit) = text.split_at(split);
    let value: f64 = value.parse().ok()?;
    let secs = match unit {
        "s" => value,
        "ms" => value / 1e3,
        "µs" | "us" => value / 1e6,
        "ns" => value / 1e9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

/// Per phase, p50 and p90 in ms over the plugin's PreStart log lines for pods named
/// `bench/<prefix>…`, in the part of the log written since `since` (its length earlier: the log
/// is appended to by every run).
fn phase_report(log: &str, since: usize, prefix: &str) {
    let log = log.get(since..).unwrap_or_default();
    let pod = format!("pod=bench/{prefix}");
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("PreStartContainer: interfaces up") && l.contains(&pod))
        .collect();
    for phase in PHASES {
        let key = format!("{phase}=");
        let mut values: Vec<Duration> = lines
            .iter()
            .filter_map(|l| {
                let value = l.split_whitespace().find_map(|w| w.strip_prefix(&key))?;
                parse_debug_duration(value)
            })
            .collect();
        values.sort();
        println!(
            "  phase {phase:<16} n={} p50={:.1} ms p90={:.1} ms",
            values.len(),
            percentile(&values, 50.0).as_secs_f64() * 1e3,
            percentile(&values, 90.0).as_secs_f64() * 1e3
        );
    }
}

/// How long the idle daemon is watched.
const IDLE_WINDOW: Duration = Duration::from_secs(30);

/// utime + stime of process `pid`, in clock ticks (`/proc/<pid>/stat` fields 14 and 15).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces: count fields after its closing parenthesis.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow::anyhow!("unexpected /proc/{pid}/stat: {stat}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<u64> {
        Ok(fields
            .get(i)
            .ok_or_else(|| anyhow::anyhow!("short /proc/{pid}/stat"))?
            .parse()?)
    };
    // rest starts at field 3 (state): utime is field 14, stime field 15.
    Ok(field(11)? + field(12)?)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/{pid}/status"))?
        .parse()
        .map_err(Into::into)
}

fn check(pod: &StartedPod) -> Result<()> {
    match &pod.failure {
        Some(f) => bail!("{}: {f}", pod.spec.name),
        None => Ok(()),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "machine: test-bed VM (qemu TCG), {cpus} vCPUs, kernel {}",
        kernel.trim()
    );
    let t = TestNode::start(200, "127.0.0.1:9720").await?;

    // One after another: each pod is deleted before the next starts, so the node stays small.
    let log_mark = t.plugin.log().len();
    let started = Instant::now();
    let mut solo = Vec::with_capacity(args.sequential);
    for i in 0..args.sequential {
        let pod = t.node.run_pod(&spec(format!("seq-{i}"))).await?;
        check(&pod)?;
        solo.push(pod.prestart);
        t.node.delete_pod(&pod).await?;
    }
    println!(
        "sequential: {} pods in {:.1} s",
        args.sequential,
        started.elapsed().as_secs_f64()
    );
    let (solo_p50, solo_p99) = report("PreStart solo      ", solo);
    phase_report(&t.plugin.log(), log_mark, "seq-");

    let log_mark = t.plugin.log().len();
    let started = Instant::now();
    let specs: Vec<PodSpec> = (0..args.concurrent)
        .map(|i| spec(format!("par-{i}")))
        .collect();
    let pods = futures::future::join_all(specs.iter().map(|s| t.node.run_pod(s))).await;
    let mut concurrent = Vec::with_capacity(args.concurrent);
    let mut started_pods = Vec::new();
    for pod in pods {
        let pod = pod?;
        check(&pod)?;
        concurrent.push(pod.prestart);
        started_pods.push(pod);
    }
    println!(
        "concurrent: {} pods in {:.1} s",
        args.concurrent,
        started.elapsed().as_secs_f64()
    );
    let (_, conc_p99) = report("PreStart concurrent", concurrent);
    phase_report(&t.plugin.log(), log_mark, "par-");

    // The daemon at rest with those pods: reconcile every 10 s, health probe, no scrapes.
    let pid = t.plugin.pid();
    let (cpu0, at) = (cpu_ticks(pid)?, Instant::now());
    tokio::time::sleep(IDLE_WINDOW).await;
    let (cpu1, window) = (cpu_ticks(pid)?, at.elapsed());
    let ticks = clock_ticks();
    println!(
        "plugin idle with {} pods ({} interfaces): {:.2} % of one CPU over {:.0} s, VmRSS {} KiB",
        started_pods.len(),
        2 * started_pods.len(),
        100.0 * (cpu1 - cpu0) as f64 / ticks / window.as_secs_f64(),
        window.as_secs_f64(),
        rss_kib(pid)?
    );
    for pod in &started_pods {
        t.node.delete_pod(pod).await?;
    }
    // The plugin's log, kept past the node for a closer look at a run.
    if let Some(path) = std::env::var_os("VCAN_BENCH_PLUGIN_LOG") {
        std::fs::write(&path, t.plugin.log())?;
    }

    println!(
        "targets: solo p99 {:.2} ms (goal <= 25 ms); concurrent p99 / solo p50 = {:.2} (goal <= 3)",
        solo_p99.as_secs_f64() * 1e3,
        conc_p99.as_secs_f64() / solo_p50.as_secs_f64().max(1e-9)
    );
    Ok(())
}
