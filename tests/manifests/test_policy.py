"""The checks themselves: each must catch the violation it exists for."""

from __future__ import annotations

import copy
import json
import tempfile
import unittest
from pathlib import Path

import check_manifests as cm
import kustomize_lite as kl

ROOT = Path(__file__).resolve().parents[2]
BASE_SOURCE = (ROOT / "deploy/base/daemonset.yaml").read_text()


def render(name: str) -> list[dict]:
    return kl.build(ROOT / "deploy" / name)


class DaemonSetPolicy(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.containerd = render("overlays/containerd")
        cls.monitoring = render("examples/monitoring")

    def mutated(self, change, objects=None) -> list[dict]:
        objects = copy.deepcopy(objects or self.containerd)
        ds = cm.one(objects, "DaemonSet")
        change(ds["spec"]["template"]["spec"])
        return objects

    def problems(self, change, flavour="containerd", source=BASE_SOURCE) -> str:
        return "\n".join(cm.check_daemonset(self.mutated(change), flavour, source))

    def test_shipped_overlays_pass(self) -> None:
        for overlay, flavour in (("containerd", "containerd"), ("k3s", "k3s"), ("microk8s", "microk8s"), ("aks", "containerd")):
            with self.subTest(overlay=overlay):
                objects = render(f"overlays/{overlay}")
                self.assertEqual(cm.check_daemonset(objects, flavour, BASE_SOURCE), [])
                self.assertEqual(cm.check_objects(objects), [])

    def test_privileged(self) -> None:
        def change(spec):
            spec["containers"][0]["securityContext"]["privileged"] = True
        self.assertIn("privileged: true is not allowed", self.problems(change))

    def test_host_namespaces(self) -> None:
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            with self.subTest(flag=flag):
                self.assertIn(f"{flag}: true", self.problems(lambda spec: spec.__setitem__(flag, True)))

    def test_unlisted_capability(self) -> None:
        def change(spec):
            spec["containers"][0]["securityContext"]["capabilities"]["add"].append("SYS_PTRACE")
        self.assertIn("SYS_PTRACE is not on the allowed list", self.problems(change))

    def test_missing_needed_capability(self) -> None:
        def change(spec):
            spec["containers"][0]["securityContext"]["capabilities"]["add"].remove("BPF")
        self.assertIn("lacks capability BPF", self.problems(change))

    def test_capability_without_comment(self) -> None:
        source = BASE_SOURCE.replace("# PERFMON:", "# (removed):")
        self.assertIn("PERFMON has no justifying comment", self.problems(lambda spec: None, source=source))

    def test_drop_all(self) -> None:
        def change(spec):
            spec["initContainers"][0]["securityContext"]["capabilities"]["drop"] = ["NET_RAW"]
        self.assertIn("modprobe-vcan: capabilities.drop must be [ALL]", self.problems(change))

    def test_socket_file_mount(self) -> None:
        def change(spec):
            vol = next(v for v in spec["volumes"] if v["name"] == "containerd-run")
            vol["hostPath"] = {"path": "/run/containerd/containerd.sock", "type": "Socket"}
            mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "containerd-run")
            mount["mountPath"] = "/run/containerd/containerd.sock"
        text = self.problems(change)
        self.assertIn("hostPath type must be Directory", text)
        self.assertIn("must be a directory, not a socket file", text)
        self.assertIn("mounted as a file", text)

    def test_netns_propagation(self) -> None:
        def change(spec):
            mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "netns")
            del mount["mountPropagation"]
        self.assertIn("HostToContainer", self.problems(change))

    def test_bidirectional(self) -> None:
        def change(spec):
            mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "bpffs")
            mount["mountPropagation"] = "Bidirectional"
        self.assertIn("Bidirectional", self.problems(change))

    def test_wrong_flavour(self) -> None:
        self.assertIn("the k3s flavour needs /run/k3s/containerd/containerd.sock", self.problems(lambda spec: None, flavour="k3s"))

    def test_socket_outside_mounts(self) -> None:
        def change(spec):
            env = next(e for e in spec["containers"][0]["env"] if e["name"] == "VCAN_CONTAINERD_SOCKET")
            env["value"] = "/run/k3s/containerd/containerd.sock"
        self.assertIn("is not inside any mounted directory", self.problems(change, flavour="k3s"))

    def test_tolerations(self) -> None:
        self.assertIn("operator: Exists", self.problems(lambda spec: spec.__setitem__("tolerations", [{"key": "a", "operator": "Exists"}])))

    def test_probes(self) -> None:
        def change(spec):
            spec["containers"][0]["readinessProbe"]["httpGet"]["path"] = "/healthz"
        self.assertIn("readinessProbe must GET /readyz", self.problems(change))

    def test_resources(self) -> None:
        def change(spec):
            del spec["containers"][0]["resources"]["limits"]
        self.assertIn("resources.limits.memory missing", self.problems(change))

    def test_unpinned_image(self) -> None:
        def change(spec):
            spec["containers"][0]["image"] = "ghcr.io/vcan-plugin/vcan-plugin:latest"
        self.assertIn("must be pinned", self.problems(change))

    def test_monitor_without_honor_labels(self) -> None:
        objects = copy.deepcopy(self.monitoring)
        cm.one(objects, "ServiceMonitor")["spec"]["endpoints"][0]["honorLabels"] = False
        self.assertIn("honorLabels must be true", "\n".join(cm.check_objects(objects)))

    def test_monitor_selecting_nothing(self) -> None:
        objects = copy.deepcopy(self.monitoring)
        cm.one(objects, "ServiceMonitor")["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] = "other"
        self.assertIn("selects no Service", "\n".join(cm.check_objects(objects)))

    def test_wrong_namespace(self) -> None:
        objects = copy.deepcopy(self.containerd)
        cm.one(objects, "Service")["metadata"]["namespace"] = "default"
        self.assertIn("is not in namespace vcan-plugin", "\n".join(cm.check_objects(objects)))


class DashboardChecks(unittest.TestCase):
    def check(self, change) -> str:
        dashboard = json.loads((ROOT / "dashboards/vcan-plugin.json").read_text())
        change(dashboard)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "d.json"
            path.write_text(json.dumps(dashboard))
            problems, _ = cm.check_dashboard_structure(path)
        return "\n".join(problems)

    def test_shipped_dashboard_passes(self) -> None:
        self.assertEqual(self.check(lambda d: None), "")

    def test_fixed_range(self) -> None:
        def change(d):
            for p in cm.all_panels(d):
                for t in p.get("targets", []):
                    t["expr"] = t["expr"].replace("[$__rate_interval]", "[5m]")

        self.assertIn("must use [$__rate_interval]", self.check(change))

    def test_missing_unit_and_description(self) -> None:
        def change(d):
            panel = next(p for p in cm.all_panels(d) if p["type"] != "row")
            panel["fieldConfig"]["defaults"].pop("unit")
            panel["description"] = ""
        text = self.check(change)
        self.assertIn("no unit", text)
        self.assertIn("no description", text)

    def test_hard_coded_datasource(self) -> None:
        def change(d):
            panel = next(p for p in cm.all_panels(d) if p["type"] != "row")
            panel["datasource"] = {"type": "prometheus", "uid": "abc123"}
        self.assertIn("datasource must be the ${datasource} variable", self.check(change))

    def test_uid(self) -> None:
        self.assertIn("uid", self.check(lambda d: d.__setitem__("uid", "random")))

    def test_metric_names(self) -> None:
        self.assertEqual(cm.metric_names('sum by (le) (rate(vcan_plugin_x_bucket{a="b"}[5m])) / up'), {"vcan_plugin_x_bucket", "up"})
        self.assertNotIn("vcan_plugin_x_bucket", cm.KNOWN_SERIES)


if __name__ == "__main__":
    unittest.main()
