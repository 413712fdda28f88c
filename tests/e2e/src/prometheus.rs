//! A real Prometheus for the dashboard tests: Debian's `prometheus`, run in the guest with a
//! throwaway TSDB and scraping plugin instances every second, and the panel queries of the
//! Grafana dashboard (`dashboards/vcan-plugin.json`) with its template variables filled in, so
//! that tests can check that each panel draws something.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use vcan_e2e::prometheus::{Prometheus, RowSelect, dashboard_queries, finite_values, unix_now};
//!
//! let panels = dashboard_queries(RowSelect::Only(&["Buses across nodes"]))?;
//! let mut prometheus = Prometheus::start("127.0.0.1:9791", &[("10.99.0.1:9720", "node-a")])?;
//! prometheus.wait_ready(Duration::from_secs(180)).await?;
//! let since = unix_now();
//! for (title, expr) in &panels.queries {
//!     let result = prometheus
//!         .query_range(expr, since, unix_now())
//!         .map_err(anyhow::Error::msg)?;
//!     println!("{title}: {} finite values", finite_values(&result).len());
//! }
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The job name Prometheus scrapes the plugins as, and the dashboard's `$job`.
pub const JOB: &str = "vcan-plugin";

/// Debian's Prometheus, run in the guest with a throwaway TSDB; killed (and its TSDB removed)
/// on drop.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    dir: PathBuf,
    address: String,
}

impl Prometheus {
    /// Starts Prometheus listening on `address`, scraping each `(target, node)` of `targets`
    /// (a plugin's metrics address, `host:port`) every second as job [`JOB`], with the `node`
    /// label the dashboard and alerts expect set to `node`.
    pub fn start(address: &str, targets: &[(&str, &str)]) -> Result<Self> {
        // One directory per process and address, so that two instances never share a TSDB.
        let dir = std::env::temp_dir().join(format!(
            "vcan-prometheus-{}-{}",
            std::process::id(),
            address.replace(|c: char| !c.is_ascii_alphanumeric(), "-")
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data"))
            .with_context(|| format!("create {}", dir.display()))?;
        let mut config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n"
        );
        for (target, node) in targets {
            config.push_str(&format!(
                "      - targets: ['{target}']\n        labels:\n          node: {node}\n"
            ));
        }
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config)
            .with_context(|| format!("write {}", config_path.display()))?;
        let log_path = dir.join("prometheus.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("create {}", log_path.display()))?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                log.try_clone().context("duplicate the log's fd")?,
            ))
            .stderr(Stdio::from(log))
            .spawn()
            .context("start prometheus (Debian package prometheus)")?;
        Ok(Prometheus {
            child,
            dir,
            address: address.to_string(),
        })
    }

    /// What Prometheus logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// Waits until Prometheus answers `/-/ready` (its TSDB is open, scraping has begun); fails
    /// with its log if it exits or is not ready within `timeout`.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Ok((200, _)) = http10_get(&self.address, "/-/ready") {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait().context("prometheus status")? {
                bail!("prometheus exited with {status}:\n{}", self.log());
            }
            if started.elapsed() >= timeout {
                bail!("prometheus not ready after {timeout:?}:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// GET on the HTTP API; returns `data` of a successful answer.
    fn api(&self, path: &str) -> std::result::Result<Value, String> {
        let (status, body) = http10_get(&self.address, path)?;
        let v: Value =
            serde_json::from_str(&body).map_err(|e| format!("{path}: {status}: {e}: {body}"))?;
        if status != 200 || v["status"] != "success" {
            return Err(format!("{path}: {status}: {body}"));
        }
        Ok(v["data"].clone())
    }

    /// An instant query's result vector. Errors are plain complaints, as tests poll queries
    /// until they answer what they expect and report the last complaint.
    pub fn query(&self, expr: &str) -> std::result::Result<Vec<Value>, String> {
        let data = self.api(&format!("/api/v1/query?query={}", url_encode(expr)))?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// A range query's result matrix from `start` to `end` (Unix seconds), one point per
    /// second, as Grafana draws a panel.
    pub fn query_range(
        &self,
        expr: &str,
        start: f64,
        end: f64,
    ) -> std::result::Result<Vec<Value>, String> {
        let data = self.api(&format!(
            "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step=1",
            url_encode(expr)
        ))?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// What a panel showing `expr` draws from `start` until now: the finite values of the range
    /// query, or a complaint naming the series that have none (a panel without them is empty).
    pub fn panel_values(&self, expr: &str, start: f64) -> std::result::Result<Vec<f64>, String> {
        let result = self.query_range(expr, start, unix_now())?;
        let values = finite_values(&result);
        if values.is_empty() {
            let labels: Vec<String> = result.iter().map(|s| s["metric"].to_string()).collect();
            Err(format!(
                "{} series, none with a finite value: {}",
                result.len(),
                labels.join(", ")
            ))
        } else {
            Ok(values)
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The finite values of a query result (vector or matrix); NaN (e.g. a quantile of no
/// observations, a ratio of zero rates) is no data on a panel.
pub fn finite_values(result: &[Value]) -> Vec<f64> {
    let mut out = Vec::new();
    for series in result {
        let points: Vec<&Value> = match series["values"].as_array() {
            Some(values) => values.iter().collect(),
            None => vec![&series["value"]],
        };
        for p in points {
            if let Some(v) = p[1].as_str().and_then(|s| s.parse::<f64>().ok())
                && v.is_finite()
            {
                out.push(v);
            }
        }
    }
    out
}

/// Now, in Unix seconds, as Prometheus' API takes times.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A minimal HTTP/1.0 GET: Prometheus (Go's net/http) answers HTTP/1.1 requests with chunked
/// bodies, which [`crate::plugin::http_get`] does not decode; 1.0 gets a plain body.
fn http10_get(address: &str, path: &str) -> std::result::Result<(u16, String), String> {
    let mut stream =
        std::net::TcpStream::connect(address).map_err(|e| format!("connect {address}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("read from {address}: {e}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("malformed response: {response}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {head}"))?;
    Ok((status, body.to_string()))
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The dashboard

/// Which dashboard rows' panels [`dashboard_queries`] returns, by row title.
#[derive(Debug, Clone, Copy)]
pub enum RowSelect<'a> {
    /// Every row but these (e.g. rows a test's setup cannot feed, checked by another test).
    Except(&'a [&'a str]),
    /// Only these rows.
    Only(&'a [&'a str]),
}

impl RowSelect<'_> {
    fn rows(&self) -> &[&str] {
        match self {
            RowSelect::Except(rows) | RowSelect::Only(rows) => rows,
        }
    }

    fn selects(&self, row: &str) -> bool {
        match self {
            RowSelect::Except(rows) => !rows.contains(&row),
            RowSelect::Only(rows) => rows.contains(&row),
        }
    }
}

/// The panel queries [`dashboard_queries`] selected, and the panels it left out.
#[derive(Debug, Clone, Default)]
pub struct DashboardQueries {
    /// (panel title, expression with the template variables substituted), in dashboard order;
    /// a panel with several queries appears once per query.
    pub queries: Vec<(String, String)>,
    /// `row: panel title` of every panel of the rows not selected.
    pub skipped: Vec<String>,
}

/// The dashboard the project ships.
pub fn dashboard_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dashboards/vcan-plugin.json")
}

/// Every panel query of the rows of `dashboards/vcan-plugin.json` that `select` selects, with
/// the template variables substituted as a user viewing all of it would have them: `$job`
/// [`JOB`], the query variables (node, namespace, pod, interface) and regex-matched custom ones
/// (direction) `.*`, `$bitrate` 500 kbit/s, `$data_bitrate` 2 Mbit/s and `$__rate_interval`
/// 10 s (a few scrapes at the tests' 1 s interval).
///
/// Fails if a query uses a variable this does not know, if nothing is selected, or if a row
/// named in `select` has no panels: a renamed or removed row must not silently drop out of a
/// test (`Only`) or linger as an exemption (`Except`).
pub fn dashboard_queries(select: RowSelect<'_>) -> Result<DashboardQueries> {
    let path = dashboard_path();
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let dashboard: Value =
        serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    let mut values = BTreeMap::from([("__rate_interval".to_string(), "10s".to_string())]);
    let variables = dashboard["templating"]["list"]
        .as_array()
        .with_context(|| format!("{}: no templating.list", path.display()))?;
    for var in variables {
        let name = var["name"]
            .as_str()
            .with_context(|| format!("{}: a variable without a name", path.display()))?
            .to_string();
        let value = match name.as_str() {
            "datasource" => continue,
            "job" => JOB,
            "bitrate" => "500000",
            "data_bitrate" => "2000000",
            // Query variables (node, namespace, pod, interface) and custom ones used as
            // regex matchers (direction): all values.
            _ => ".*",
        };
        values.insert(name, value.to_string());
    }
    let panels = dashboard["panels"]
        .as_array()
        .with_context(|| format!("{}: no panels", path.display()))?;
    let mut out = DashboardQueries::default();
    // Rows named in `select` that have at least one panel.
    let mut seen_rows: Vec<String> = Vec::new();
    walk(
        panels,
        String::new(),
        &select,
        &values,
        &mut out,
        &mut seen_rows,
    )
    .with_context(|| path.display().to_string())?;
    for row in select.rows() {
        if !seen_rows.iter().any(|r| r == row) {
            bail!("{}: no panels in row {row:?}", path.display());
        }
    }
    if out.queries.is_empty() {
        bail!("{}: no panel queries in the rows selected", path.display());
    }
    Ok(out)
}

/// Collects the queries of `panels` into `out`. A row's panels follow it at the top level, or
/// are nested in it when it is collapsed.
fn walk(
    panels: &[Value],
    mut row: String,
    select: &RowSelect<'_>,
    values: &BTreeMap<String, String>,
    out: &mut DashboardQueries,
    seen_rows: &mut Vec<String>,
) -> Result<()> {
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        if panel["type"] == "row" {
            row = title.to_string();
        }
        if let Some(nested) = panel["panels"].as_array() {
            walk(nested, row.clone(), select, values, out, seen_rows)?;
        }
        if panel["type"] == "row" {
            continue;
        }
        if select.rows().contains(&row.as_str()) && !seen_rows.contains(&row) {
            seen_rows.push(row.clone());
        }
        if !select.selects(&row) {
            out.skipped.push(format!("{row}: {title}"));
            continue;
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str().filter(|e| !e.trim().is_empty()) {
                let expr = substitute(expr, values);
                if expr.contains('$') || expr.contains("[[") {
                    bail!("panel {title:?}: a variable the tests do not know: {expr}");
                }
                out.queries.push((title.to_string(), expr));
            }
        }
    }
    Ok(())
}

/// Replaces Grafana variables (`$name`, `${name}`, `${name:format}`, `[[name]]`) by `values`;
/// unknown ones are left as they are.
fn substitute(expr: &str, values: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(i) = rest.find(['$', '[']) {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let (name, len) = if let Some(braced) = rest.strip_prefix("${") {
            match braced.find('}') {
                Some(end) => (braced[..end].split(':').next().unwrap_or(""), end + 3),
                None => ("", 0),
            }
        } else if let Some(bracketed) = rest.strip_prefix("[[") {
            match bracketed.find("]]") {
                Some(end) => (&bracketed[..end], end + 4),
                None => ("", 0),
            }
        } else if let Some(plain) = rest.strip_prefix('$') {
            let end = plain
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(plain.len());
            (&plain[..end], end + 1)
        } else {
            ("", 0)
        };
        match values.get(name) {
            Some(value) if len > 0 => {
                out.push_str(value);
                rest = &rest[len..];
            }
            _ => {
                out.push_str(&rest[..1]);
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitutes_every_variable_syntax() {
        let values = BTreeMap::from([
            ("job".to_string(), "vcan-plugin".to_string()),
            ("__rate_interval".to_string(), "10s".to_string()),
        ]);
        assert_eq!(
            substitute(
                "rate(x{job=~\"$job\", a=\"${job:regex}\", b=\"[[job]]\"}[$__rate_interval]) $other",
                &values
            ),
            "rate(x{job=~\"vcan-plugin\", a=\"vcan-plugin\", b=\"vcan-plugin\"}[10s]) $other"
        );
    }

    #[test]
    fn selects_rows_of_the_shipped_dashboard() {
        let tunnel = dashboard_queries(RowSelect::Only(&["Buses across nodes"])).expect("only");
        let rest = dashboard_queries(RowSelect::Except(&["Buses across nodes"])).expect("except");
        assert!(!tunnel.queries.is_empty());
        assert!(
            tunnel
                .queries
                .iter()
                .all(|(_, e)| e.contains("vcan_plugin_tunnel_"))
        );
        // Each selection skips exactly the panels the other one queries.
        let tunnel_panels: std::collections::BTreeSet<&str> =
            tunnel.queries.iter().map(|(t, _)| t.as_str()).collect();
        let skipped: std::collections::BTreeSet<&str> = rest
            .skipped
            .iter()
            .map(|s| s.trim_start_matches("Buses across nodes: "))
            .collect();
        assert_eq!(tunnel_panels, skipped);
        assert!(
            dashboard_queries(RowSelect::Except(&["No such row"])).is_err(),
            "an exemption for a row that is gone is an error"
        );
    }
}
