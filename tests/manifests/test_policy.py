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

    def test_shared_buses_component_passes(self) -> None:
        objects = self.with_buses()
        self.assertEqual(cm.check_daemonset(objects, "containerd", BASE_SOURCE), [])
        self.assertEqual(cm.check_objects(objects), [])

    def with_buses(self) -> list[dict]:
        return self.with_components("shared-buses")

    def with_components(self, *components: str) -> list[dict]:
        (ROOT / "target").mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(dir=ROOT / "target") as d:
            k = Path(d) / "kustomization.yaml"
            k.write_text(json.dumps({
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [str(Path("..") / ".." / "deploy/overlays/containerd")],
                "components": [str(Path("..") / ".." / "deploy/components" / c) for c in components],
            }))
            return kl.build(Path(d))

    def test_buses_need_a_bidirectional_host_state_dir(self) -> None:
        def change(spec):
            for m in spec["containers"][0]["volumeMounts"]:
                if m["name"] == "state":
                    m["mountPropagation"] = "HostToContainer"
        problems = "\n".join(cm.check_daemonset(self.mutated(change, self.with_buses()), "containerd", BASE_SOURCE))
        self.assertIn("needs mountPropagation: Bidirectional", problems)

    def test_privileged_init_container_is_refused_even_with_buses(self) -> None:
        def change(spec):
            spec["initContainers"][0]["securityContext"]["privileged"] = True
        problems = "\n".join(cm.check_daemonset(self.mutated(change, self.with_buses()), "containerd", BASE_SOURCE))
        self.assertIn("modprobe-vcan: privileged: true is not allowed", problems)

    def test_bus_config_outside_a_configmap(self) -> None:
        def change(spec):
            for e in spec["containers"][0]["env"]:
                if e["name"] == "VCAN_BUS_CONFIG":
                    e["value"] = "/tmp/buses.json"
        problems = "\n".join(cm.check_daemonset(self.mutated(change, self.with_buses()), "containerd", BASE_SOURCE))
        self.assertIn("must be a ConfigMap volume mount", problems)

    def test_host_namespaces(self) -> None:
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            with self.subTest(flag=flag):
                self.assertIn(f"{flag}: true", self.problems(lambda spec: spec.__setitem__(flag, True)))

    # Physical CAN (components/physical-can): hostNetwork, only with a hardware configuration.

    def hardware_problems(self, change, *components: str) -> str:
        objects = self.with_components(*(components or ("physical-can",)))
        return "\n".join(cm.check_daemonset(self.mutated(change, objects), "containerd", BASE_SOURCE))

    def test_physical_can_component_passes(self) -> None:
        for components in (("physical-can",), ("physical-can", "shared-buses"), ("shared-buses", "physical-can")):
            with self.subTest(components=components):
                objects = self.with_components(*components)
                spec = cm.one(objects, "DaemonSet")["spec"]["template"]["spec"]
                self.assertIs(spec["hostNetwork"], True)
                self.assertEqual(cm.check_daemonset(objects, "containerd", BASE_SOURCE), [])
                self.assertEqual(cm.check_objects(objects), [])

    def test_components_share_the_state_volume(self) -> None:
        for components in (("physical-can", "shared-buses"), ("shared-buses", "physical-can")):
            with self.subTest(components=components):
                spec = cm.one(self.with_components(*components), "DaemonSet")["spec"]["template"]["spec"]
                self.assertEqual([v["name"] for v in spec["volumes"]].count("state"), 1)
                state = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "state"]
                self.assertEqual(state, [{"name": "state", "mountPath": "/run/vcan-plugin", "mountPropagation": "Bidirectional"}])

    def test_host_network_without_a_hardware_config_is_refused(self) -> None:
        def change(spec):
            env = spec["containers"][0]["env"]
            env[:] = [e for e in env if e["name"] != "VCAN_HARDWARE_CONFIG"]
        for components in (("physical-can",), ("physical-can", "shared-buses")):
            with self.subTest(components=components):
                self.assertIn(
                    "hostNetwork: true is not allowed without a hardware configuration",
                    self.hardware_problems(change, *components),
                )

    def test_host_network_with_only_buses_is_refused(self) -> None:
        def change(spec):
            spec["hostNetwork"] = True
            spec["dnsPolicy"] = "ClusterFirstWithHostNet"
        problems = "\n".join(cm.check_daemonset(self.mutated(change, self.with_buses()), "containerd", BASE_SOURCE))
        self.assertIn("hostNetwork: true is not allowed without a hardware configuration", problems)

    def test_hardware_config_needs_host_network(self) -> None:
        self.assertIn(
            "needs hostNetwork: true",
            self.hardware_problems(lambda spec: spec.__setitem__("hostNetwork", False)),
        )

    def test_host_network_needs_cluster_first_with_host_net(self) -> None:
        self.assertIn(
            "hostNetwork needs dnsPolicy: ClusterFirstWithHostNet",
            self.hardware_problems(lambda spec: spec.pop("dnsPolicy")),
        )

    def test_other_host_namespaces_stay_refused_with_hardware(self) -> None:
        for flag in ("hostPID", "hostIPC"):
            with self.subTest(flag=flag):
                self.assertIn(f"{flag}: true is not allowed", self.hardware_problems(lambda spec: spec.__setitem__(flag, True)))

    def test_physical_can_alone_is_not_privileged(self) -> None:
        def change(spec):
            spec["containers"][0]["securityContext"]["privileged"] = True
            for m in spec["containers"][0]["volumeMounts"]:
                if m["name"] == "state":
                    m["mountPropagation"] = "Bidirectional"
        problems = self.hardware_problems(change)
        self.assertIn("vcan-plugin: privileged: true is not allowed", problems)
        self.assertIn("Bidirectional propagation needs a privileged container", problems)

    def test_hardware_config_outside_a_configmap(self) -> None:
        def change(spec):
            for e in spec["containers"][0]["env"]:
                if e["name"] == "VCAN_HARDWARE_CONFIG":
                    e["value"] = "/tmp/hardware.json"
        self.assertIn("VCAN_HARDWARE_CONFIG /tmp/hardware.json: /tmp must be a ConfigMap volume mount", self.hardware_problems(change))

    def test_hardware_config_mount_writable(self) -> None:
        def change(spec):
            for m in spec["containers"][0]["volumeMounts"]:
                if m["name"] == "hardware":
                    del m["readOnly"]
        self.assertIn("the hardware configuration mount /etc/vcan-plugin-hardware must be read-only", self.hardware_problems(change))

    def test_hardware_state_dir_must_be_the_hosts(self) -> None:
        def change(spec):
            spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "state"] + [
                {"name": "state", "emptyDir": {}}
            ]
        self.assertIn("VCAN_STATE_DIR /run/vcan-plugin must be the host's /run/vcan-plugin", self.hardware_problems(change))

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

    def test_bpffs_dir_off_bpffs(self) -> None:
        def change(spec):
            spec["containers"][0]["env"].append({"name": "VCAN_BPFFS_DIR", "value": "/var/lib/kubelet/device-plugins/bpf"})
        self.assertIn("not the host's bpffs", self.problems(change))

    def test_bpffs_dir_outside_mounts(self) -> None:
        def change(spec):
            spec["containers"][0]["env"].append({"name": "VCAN_BPFFS_DIR", "value": "/run/vcan-bpf"})
        self.assertIn("bpffs directory (VCAN_BPFFS_DIR) (/run/vcan-bpf) is not inside any mounted directory", self.problems(change))

    def test_wrong_namespace(self) -> None:
        objects = copy.deepcopy(self.containerd)
        cm.one(objects, "Service")["metadata"]["namespace"] = "default"
        self.assertIn("is not in namespace vcan-plugin", "\n".join(cm.check_objects(objects)))


def build_with(*components: str, overlay: str = "containerd") -> list[dict]:
    """The overlay with components, as a kustomization of one's own would render it."""
    (ROOT / "target").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / "target") as d:
        (Path(d) / "kustomization.yaml").write_text(json.dumps({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [str(Path("..") / ".." / "deploy/overlays" / overlay)],
            "components": [str(Path("..") / ".." / "deploy/components" / c) for c in components],
        }))
        return kl.build(Path(d))


def named(objects: list[dict], kind: str, name: str) -> dict:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


class CrossNodeBuses(unittest.TestCase):
    """components/cross-node-buses: the peer Service, the tunnel ports and their NetworkPolicy."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.cross = build_with("shared-buses", "cross-node-buses")

    def problems(self, change, objects=None) -> str:
        objects = copy.deepcopy(objects or self.cross)
        change(objects)
        return "\n".join(cm.check_objects(objects))

    @staticmethod
    def plugin(objects: list[dict]) -> dict:
        return cm.one(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]

    @classmethod
    def set_env(cls, objects: list[dict], name: str, value: str) -> None:
        env = cls.plugin(objects)["env"]
        env[:] = [e for e in env if e["name"] != name] + [{"name": name, "value": value}]

    @staticmethod
    def set_buses(objects: list[dict], buses: list[dict]) -> None:
        named(objects, "ConfigMap", "vcan-plugin-buses")["data"]["buses.json"] = json.dumps({"buses": buses})

    @staticmethod
    def service(objects: list[dict]) -> dict:
        return named(objects, "Service", "vcan-plugin-peers")

    @staticmethod
    def tunnel_policy(objects: list[dict]) -> dict:
        return named(objects, "NetworkPolicy", "vcan-plugin-tunnel")

    def test_component_passes(self) -> None:
        for components, overlay in (
            (("shared-buses", "cross-node-buses"), "containerd"),
            (("cross-node-buses", "shared-buses", "servicemonitor"), "k3s"),
            (("physical-can", "shared-buses", "cross-node-buses"), "microk8s"),
        ):
            with self.subTest(components=components):
                objects = build_with(*components, overlay=overlay)
                self.assertEqual(cm.check_objects(objects), [])
                self.assertEqual(cm.check_daemonset(objects, overlay, BASE_SOURCE), [])
                plugin = self.plugin(objects)
                self.assertIn({"name": "tunnel-20000", "containerPort": 20000, "protocol": "UDP"}, plugin["ports"])
                self.assertEqual(cm.env_of(plugin)["VCAN_PEER_SERVICE"], "vcan-plugin-peers.vcan-plugin.svc.cluster.local.")
                self.assertEqual(cm.env_of(plugin)["VCAN_TUNNEL_KEY_FILE"], "/etc/vcan-plugin-tunnel-key/key")
                self.assertIn({"name": "tunnel-key", "mountPath": "/etc/vcan-plugin-tunnel-key", "readOnly": True}, plugin["volumeMounts"])
                spec = cm.one(objects, "DaemonSet")["spec"]["template"]["spec"]
                key = next(v for v in spec["volumes"] if v["name"] == "tunnel-key")
                self.assertEqual(key["secret"]["secretName"], "vcan-plugin-tunnel-key")
                self.assertEqual(key["secret"]["defaultMode"], 0o400)
                self.assertIs(key["secret"]["optional"], False)
                # No key ships with the manifests: every install would share it.
                self.assertEqual(cm.objects_of(objects, "Secret"), [])

    def test_a_cluster_bus_on_the_shipped_port_passes(self) -> None:
        def change(objects):
            self.set_buses(objects, [{"name": "powertrain", "span": "cluster", "peers": ["192.0.2.10:20000"]}])
        self.assertEqual(self.problems(change), "")

    def test_a_service_that_is_not_headless_is_refused(self) -> None:
        def change(objects):
            self.service(objects)["spec"].pop("clusterIP")
        self.assertIn("is not headless (clusterIP: None)", self.problems(change))

    def test_not_ready_addresses_must_be_published(self) -> None:
        def change(objects):
            self.service(objects)["spec"]["publishNotReadyAddresses"] = False
        self.assertIn("needs publishNotReadyAddresses: true", self.problems(change))

    def test_the_peer_service_must_be_in_the_rendering(self) -> None:
        for value, expected in (
            ("vcan-plugin-buddies.vcan-plugin.svc.cluster.local", "no Service vcan-plugin/vcan-plugin-buddies"),
            ("vcan-plugin-peers.default.svc.cluster.local", "no Service default/vcan-plugin-peers"),
            ("vcan-plugin-peers", "must be a Service's DNS name"),
            ("peers.example.com", "must be a Service's DNS name"),
        ):
            with self.subTest(value=value):
                self.assertIn(expected, self.problems(lambda objects: self.set_env(objects, "VCAN_PEER_SERVICE", value)))
        # Ending at .svc leaves the cluster domain to the pod's DNS search path.
        self.assertEqual(self.problems(lambda objects: self.set_env(objects, "VCAN_PEER_SERVICE", "vcan-plugin-peers.vcan-plugin.svc")), "")

    def test_the_service_must_select_the_plugin_pods(self) -> None:
        for selector in ({}, {"app.kubernetes.io/name": "other"}):
            with self.subTest(selector=selector):
                def change(objects, selector=selector):
                    self.service(objects)["spec"]["selector"] = selector
                self.assertIn("must select the DaemonSet's pods", self.problems(change))

    def test_service_ports_must_be_udp_container_ports(self) -> None:
        def no_container_port(objects):
            self.plugin(objects)["ports"] = [pt for pt in self.plugin(objects)["ports"] if pt["protocol"] != "UDP"]
        self.assertIn("targets 'tunnel-20000', which is no UDP port of the plugin container", self.problems(no_container_port))

        def tcp(objects):
            self.service(objects)["spec"]["ports"][0]["protocol"] = "TCP"
        self.assertIn("port tunnel-20000 must be UDP", self.problems(tcp))

        def other_number(objects):
            self.service(objects)["spec"]["ports"][0]["port"] = 30000
        self.assertIn("port 30000 targets container port 20000", self.problems(other_number))

        def none(objects):
            self.service(objects)["spec"]["ports"] = []
        self.assertIn("has no port", self.problems(none))

    def test_the_tunnel_port_is_not_open_to_everyone(self) -> None:
        cases = (
            ("no from", {"ports": [{"port": 20000, "protocol": "UDP"}]}, "admits every source"),
            ("every port", {"from": [{"namespaceSelector": {}}]}, "admits more than the plugin's pods"),
            (
                "a namespace",
                {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
                 "ports": [{"port": "tunnel-20000", "protocol": "UDP"}]},
                "admits more than the plugin's pods",
            ),
            (
                "every pod",
                {"from": [{"podSelector": {}}], "ports": [{"port": 19000, "endPort": 21000, "protocol": "UDP"}]},
                "admits more than the plugin's pods",
            ),
            ("the internet", {"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 20000, "protocol": "UDP"}]}, "wider than /16"),
            ("a /8", {"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 20000, "protocol": "UDP"}]}, "wider than /16"),
        )
        for what, rule, expected in cases:
            with self.subTest(what=what):
                def change(objects, rule=rule):
                    self.tunnel_policy(objects)["spec"]["ingress"].append(rule)
                self.assertIn(expected, self.problems(change))

    def test_a_tcp_rule_does_not_open_the_tunnel(self) -> None:
        def change(objects):
            self.tunnel_policy(objects)["spec"]["ingress"].append({"ports": [{"port": 20000}]})
        self.assertEqual(self.problems(change), "")

    def test_instances_must_be_admitted(self) -> None:
        def change(objects):
            self.tunnel_policy(objects)["spec"]["ingress"].pop(0)
        self.assertIn("no NetworkPolicy admits the tunnel port 20000/UDP from the plugin's pods", self.problems(change))

    def test_the_tunnel_and_dns_must_get_out(self) -> None:
        def change(objects):
            self.tunnel_policy(objects)["spec"]["egress"] = []
        problems = self.problems(change)
        self.assertIn("no rule lets the tunnel port 20000/UDP out to the plugin's pods", problems)
        self.assertIn("no rule lets DNS (53/UDP) out", problems)

    def test_the_metrics_port_stays_open(self) -> None:
        def change(objects):
            named(objects, "NetworkPolicy", "vcan-plugin")["spec"]["ingress"] = []
        self.assertIn("no NetworkPolicy opens the metrics port", self.problems(change))

    def test_the_peer_service_needs_buses(self) -> None:
        objects = build_with("cross-node-buses")
        self.assertIn("VCAN_PEER_SERVICE without a bus configuration", "\n".join(cm.check_objects(objects)))

    def test_a_cluster_bus_needs_the_peer_service(self) -> None:
        objects = build_with("shared-buses")
        self.set_buses(objects, [{"name": "powertrain", "span": "cluster"}])
        self.assertIn("bus powertrain spans the cluster but VCAN_PEER_SERVICE is not set", "\n".join(cm.check_objects(objects)))

    def test_each_bus_needs_its_port_everywhere(self) -> None:
        def change(objects):
            self.set_buses(objects, [
                {"name": "powertrain", "span": "cluster"},
                {"name": "body", "span": "cluster", "port": 20001, "peers": ["198.51.100.7:20001"]},
            ])
        problems = self.problems(change)
        self.assertIn("bus body: its tunnel port 20001 is no UDP containerPort of the plugin (name it tunnel-20001)", problems)
        self.assertIn("bus body: Service/vcan-plugin-peers has no port 20001", problems)
        self.assertIn("no NetworkPolicy admits the tunnel port 20001/UDP from the plugin's pods", problems)
        self.assertIn("bus body: no NetworkPolicy ipBlock admits its peer 198.51.100.7 on port 20001/UDP", problems)
        self.assertIn("bus body: no NetworkPolicy ipBlock lets its frames out to the peer 198.51.100.7:20001", problems)
        self.assertNotIn("powertrain", problems)

    # The tunnel key: instances authenticate their packets with a key from a Secret.

    @staticmethod
    def spec(objects: list[dict]) -> dict:
        return cm.one(objects, "DaemonSet")["spec"]["template"]["spec"]

    def cluster_bus(self, objects: list[dict]) -> None:
        self.set_buses(objects, [{"name": "powertrain", "span": "cluster"}])

    def test_a_cluster_bus_needs_the_tunnel_key(self) -> None:
        def no_env(objects):
            self.cluster_bus(objects)
            env = self.plugin(objects)["env"]
            env[:] = [e for e in env if e["name"] != "VCAN_TUNNEL_KEY_FILE"]
        problems = self.problems(no_env)
        self.assertIn("bus powertrain spans the cluster but VCAN_TUNNEL_KEY_FILE is not set", problems)
        self.assertIn("a read-only volumeMount at <dir> of a Secret volume", problems)

    def test_the_peer_service_alone_needs_the_tunnel_key(self) -> None:
        # The shipped bus configuration has no cluster bus; the component is for them.
        def no_env(objects):
            env = self.plugin(objects)["env"]
            env[:] = [e for e in env if e["name"] != "VCAN_TUNNEL_KEY_FILE"]
        self.assertIn("VCAN_PEER_SERVICE is set (for buses that span the cluster) but VCAN_TUNNEL_KEY_FILE is not set", self.problems(no_env))

    def test_node_buses_need_no_tunnel_key(self) -> None:
        objects = build_with("shared-buses")
        self.set_buses(objects, [{"name": "body", "peers": ["192.0.2.10:20000"]}])
        self.assertNotIn("VCAN_TUNNEL_KEY_FILE", "\n".join(cm.check_objects(objects)))

    def test_the_tunnel_key_must_come_from_a_secret(self) -> None:
        def no_volume(objects):
            self.cluster_bus(objects)
            spec = self.spec(objects)
            spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "tunnel-key"]
            mounts = self.plugin(objects)["volumeMounts"]
            mounts[:] = [m for m in mounts if m["name"] != "tunnel-key"]
        self.assertIn(
            "VCAN_TUNNEL_KEY_FILE /etc/vcan-plugin-tunnel-key/key is inside no volumeMount",
            self.problems(no_volume),
        )

        def outside_mounts(objects):
            self.cluster_bus(objects)
            self.set_env(objects, "VCAN_TUNNEL_KEY_FILE", "/tunnel.key")
        self.assertIn("VCAN_TUNNEL_KEY_FILE /tunnel.key is inside no volumeMount", self.problems(outside_mounts))

        def config_map(objects):
            self.cluster_bus(objects)
            volume = next(v for v in self.spec(objects)["volumes"] if v["name"] == "tunnel-key")
            volume.pop("secret")
            volume["configMap"] = {"name": "vcan-plugin-tunnel-key"}
        self.assertIn("of volume tunnel-key, which is no Secret volume", self.problems(config_map))

    def test_the_tunnel_key_mount(self) -> None:
        def writable(objects):
            next(m for m in self.plugin(objects)["volumeMounts"] if m["name"] == "tunnel-key").pop("readOnly")
        self.assertIn("the tunnel key mount /etc/vcan-plugin-tunnel-key must be read-only", self.problems(writable))

        def optional(objects):
            next(v for v in self.spec(objects)["volumes"] if v["name"] == "tunnel-key")["secret"]["optional"] = True
        self.assertIn("the tunnel key's Secret volume tunnel-key is optional", self.problems(optional))

        def other_file(objects):
            self.set_env(objects, "VCAN_TUNNEL_KEY_FILE", "/etc/vcan-plugin-tunnel-key/tunnel.key")
        self.assertIn("the Secret volume tunnel-key holds only key, not tunnel.key", self.problems(other_file))

    def test_a_secret_volume_only_for_the_tunnel_key(self) -> None:
        # Without a tunnel key, a Secret volume stays unexpected.
        objects = build_with("shared-buses")
        self.spec(objects)["volumes"].append({"name": "other", "secret": {"secretName": "other"}})
        problems = "\n".join(cm.check_daemonset(objects, "containerd", BASE_SOURCE))
        self.assertIn("volume other: only hostPath directories and emptyDir are expected", problems)
        self.assertEqual(cm.check_daemonset(self.cross, "containerd", BASE_SOURCE), [])

    # Peers: "address:port" or {"address": ..., "via": ...}, IPv4 only.

    def test_an_object_peer_is_accepted_and_checked(self) -> None:
        def admitted(objects):
            self.set_buses(objects, [
                {"name": "powertrain", "span": "cluster", "peers": [{"address": "192.0.2.10:20000", "via": "10.0.0.1"}]},
            ])
        self.assertEqual(self.problems(admitted), "")

        def without_via(objects):
            self.set_buses(objects, [{"name": "powertrain", "span": "cluster", "peers": [{"address": "192.0.2.10:20000"}]}])
        self.assertEqual(self.problems(without_via), "")

        def not_admitted(objects):
            self.set_buses(objects, [
                {"name": "powertrain", "span": "cluster", "peers": [{"address": "198.51.100.7:20000", "via": "10.0.0.1"}]},
            ])
        problems = self.problems(not_admitted)
        self.assertIn("bus powertrain: no NetworkPolicy ipBlock admits its peer 198.51.100.7 on port 20000/UDP", problems)
        self.assertIn("bus powertrain: no NetworkPolicy ipBlock lets its frames out to the peer 198.51.100.7:20000", problems)

    def test_bad_peers_are_refused(self) -> None:
        cases = (
            ({"address": "192.0.2.10"}, "peer '192.0.2.10' is not an address with a port"),
            ("192.0.2.10:", "peer '192.0.2.10:' is not an address with a port"),
            ({"via": "10.0.0.1"}, 'peer {"via": "10.0.0.1"} has no "address"'),
            ({"address": "192.0.2.10:20000", "via": "node-a"}, "via 'node-a' is not an IPv4 address: give the address of the plugin instance"),
            ({"address": "192.0.2.10:20000", "via": "2001:db8::1"}, "via '2001:db8::1' is not an IPv4 address"),
            ({"address": "192.0.2.10:20000", "port": 20000}, "unknown field port"),
            (20000, "peer 20000 is neither"),
            ("[2001:db8::10]:20000", "peer '[2001:db8::10]:20000' is an IPv6 address: the tunnel speaks IPv4 only"),
            ({"address": "[2001:db8::10]:20000"}, "is an IPv6 address: the tunnel speaks IPv4 only"),
        )
        for peer, expected in cases:
            with self.subTest(peer=peer):
                def change(objects, peer=peer):
                    self.set_buses(objects, [{"name": "powertrain", "span": "cluster", "peers": [peer]}])
                problems = self.problems(change)
                self.assertIn(expected, problems)
                self.assertTrue(problems.startswith("bus powertrain: peer "), problems)

    def test_ipv6_peers_are_refused_even_when_admitted(self) -> None:
        def change(objects):
            self.set_buses(objects, [{"name": "powertrain", "span": "cluster", "peers": ["[2001:db8::10]:20000"]}])
            policy = self.tunnel_policy(objects)["spec"]
            policy["ingress"][1]["from"].append({"ipBlock": {"cidr": "2001:db8::10/128"}})
            policy["egress"][1]["to"].append({"ipBlock": {"cidr": "2001:db8::10/128"}})
        problems = self.problems(change)
        self.assertIn("the tunnel speaks IPv4 only", problems)
        self.assertNotIn("no NetworkPolicy ipBlock", problems)

    def test_buses_cannot_share_a_port(self) -> None:
        def change(objects):
            self.set_buses(objects, [{"name": "a", "span": "cluster"}, {"name": "b", "peers": ["192.0.2.10:20000"]}])
        self.assertIn("buses a and b share the tunnel port 20000", self.problems(change))


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

    def test_traffic_query_without_pod_filter(self) -> None:
        def change(d):
            panel = next(p for p in cm.all_panels(d) if p.get("title") == "Frames/s by ID format")
            panel["targets"][0]["expr"] = panel["targets"][0]["expr"].replace(', pod=~"$pod"', "")
        self.assertIn("must honour $namespace/$pod/$interface", self.check(change))

    def test_controller_queries_need_no_pod_filter(self) -> None:
        # Controller series have no namespace/pod/interface to filter traffic by; the traffic
        # counters keep needing the filters.
        self.assertEqual(cm.TRAFFIC_COUNTERS, {"vcan_plugin_can_frames_total", "vcan_plugin_can_bytes_total", "vcan_plugin_can_id_format_frames_total"})

        def change(d):
            panel = next(p for p in cm.all_panels(d) if p.get("title") == "Controller events/s by controller and event")
            panel["targets"][0]["expr"] += ' or sum(rate(vcan_plugin_can_frames_total{job=~"$job"}[$__rate_interval]))'
        self.assertEqual(self.check(lambda d: None), "")
        self.assertIn("must honour $namespace/$pod/$interface", self.check(change))

    def test_split_frames_panels_required(self) -> None:
        def change(d):
            d["panels"] = [p for p in d["panels"] if p.get("title") != "Frames/s by ID format"]
        self.assertIn("no panel about 'id format'", self.check(change))

    def test_metric_names(self) -> None:
        self.assertEqual(cm.metric_names('sum by (le) (rate(vcan_plugin_x_bucket{a="b"}[5m])) / up'), {"vcan_plugin_x_bucket", "up"})
        self.assertNotIn("vcan_plugin_x_bucket", cm.KNOWN_SERIES)


class LabelChecks(unittest.TestCase):
    """Selectors and groupings may only use labels the plugin exports (metrics.rs)."""

    def test_id_format_is_not_on_frame_or_byte_counters(self) -> None:
        for expr in (
            'rate(vcan_plugin_can_frames_total{direction="rx", id_format="extended"}[5m])',
            'rate(vcan_plugin_can_bytes_total{id_format!="standard"}[5m])',
            "vcan_plugin_can_frames_total{job=\"vcan-plugin\", kind=\"classic\", id_format=\"standard\"}",
        ):
            with self.subTest(expr=expr):
                self.assertIn("has no label 'id_format'", "\n".join(cm.label_problems(expr)))

    def test_grouping_by_a_missing_label(self) -> None:
        problems = cm.label_problems('sum by (kind, id_format) (rate(vcan_plugin_can_frames_total{direction="rx"}[5m]))')
        self.assertEqual(problems, ["by (kind, id_format): no metric there has label 'id_format'"])
        problems = cm.label_problems("sum by (kind) (rate(vcan_plugin_can_id_format_frames_total[5m]))")
        self.assertEqual(problems, ["by (kind): no metric there has label 'kind'"])

    def test_valid_expressions(self) -> None:
        for expr in (
            'sum by (id_format) (rate(vcan_plugin_can_id_format_frames_total{direction=~"rx", id_format="extended"}[5m]))',
            'sum by (kind) (rate(vcan_plugin_can_frames_total{job="vcan-plugin", node="n", kind="error"}[5m]))',
            "histogram_quantile(0.99, sum by (le, phase) (rate(vcan_plugin_prestart_phase_duration_seconds_bucket[5m])))",
            'rate(vcan_plugin_can_id_format_frames_total{id_format="extended"}[5m]) * on (namespace, pod, interface) '
            "group_left () sum by (namespace, pod, interface) (rate(vcan_plugin_can_frames_total[5m]))",
            # Label names inside label values and comments are not selectors.
            'vcan_plugin_devices{resource="id_format=x"} # by (id_format)',
        ):
            with self.subTest(expr=expr):
                self.assertEqual(cm.label_problems(expr), [])

    def test_controller_labels(self) -> None:
        problems = cm.label_problems('sum by (node, controller, pod) (rate(vcan_plugin_can_controller_events_total{event="restarts"}[5m]))')
        self.assertEqual(problems, ["by (node, controller, pod): no metric there has label 'pod'"])
        problems = cm.label_problems('vcan_plugin_can_controller_state{kind="bus_off"} == 1')
        self.assertEqual(problems, ["vcan_plugin_can_controller_state has no label 'kind'"])

    def test_tunnel_labels(self) -> None:
        # Drops are per bus and reason, not per peer; peers have no direction outside the
        # frame, byte and packet counters.
        problems = cm.label_problems('sum by (node, bus, peer) (rate(vcan_plugin_tunnel_packets_dropped_total[5m]))')
        self.assertEqual(problems, ["by (node, bus, peer): no metric there has label 'peer'"])
        problems = cm.label_problems('vcan_plugin_tunnel_packets_lost_total{direction="rx"}')
        self.assertEqual(problems, ["vcan_plugin_tunnel_packets_lost_total has no label 'direction'"])
        self.assertEqual(cm.label_problems('max without (direction) (vcan_plugin_tunnel_packets_total{kind="instance", direction="tx"})'), [])

    def test_timed_bus_labels(self) -> None:
        # Bus load and wire counters are per bus only; members and faults per bus and member.
        problems = cm.label_problems('sum by (node, bus, pod) (rate(vcan_plugin_bus_busy_seconds_total[5m]))')
        self.assertEqual(problems, ["by (node, bus, pod): no metric there has label 'pod'"])
        problems = cm.label_problems('vcan_plugin_bus_faults_active{pod="ecu"}')
        self.assertEqual(problems, ["vcan_plugin_bus_faults_active has no label 'pod'"])
        self.assertEqual(
            cm.label_problems('histogram_quantile(0.99, sum by (bus, le) (rate(vcan_plugin_bus_queue_wait_seconds_bucket[5m])))'), []
        )
        for series in cm.timed_bus_input_series():
            with self.subTest(series=series["series"]):
                self.assertEqual(cm.label_problems(series["series"]), [])
                self.assertTrue(cm.metric_names(series["series"]) <= cm.KNOWN_SERIES)

    def test_shipped_dashboard_and_rules(self) -> None:
        dashboard = json.loads((ROOT / "dashboards/vcan-plugin.json").read_text())
        for where, expr in cm.dashboard_expressions(dashboard):
            with self.subTest(where=where):
                self.assertEqual(cm.label_problems(cm.substitute(expr)), [])
        rules = cm.load_yaml_file(ROOT / "dashboards/vcan-plugin.rules.yml")
        for rule in rules["groups"][0]["rules"]:
            with self.subTest(alert=rule["alert"]):
                self.assertEqual(cm.label_problems(rule["expr"]), [])

    def test_readme_metric_table(self) -> None:
        table = (
            "| `vcan_plugin_can_frames_total` | counter | `namespace`, `pod`, `interface`, `direction`, `kind`, `id_format` | x |\n"
            "| `vcan_plugin_can_bytes_total` | counter | same | y |\n"
            "| `vcan_plugin_vcan_supported` | gauge | | z |\n"
        )
        labels = cm.readme_metric_labels(table)
        self.assertEqual(labels["vcan_plugin_can_bytes_total"], cm.TRAFFIC_LABELS | {"kind", "id_format"})
        self.assertEqual(labels["vcan_plugin_vcan_supported"], set())
        shipped = cm.readme_metric_labels((ROOT / "deploy/README.md").read_text())
        for metric, exported in cm.METRIC_LABELS.items():
            with self.subTest(metric=metric):
                self.assertEqual(shipped.get(metric), exported)


class BusLoadInput(unittest.TestCase):
    def test_series_like_the_exporter(self) -> None:
        series = cm.bus_load_input_series("vcan0", {"classic": (10, 80), "fd": (5, 320), "error": (1, 8)}, 4)
        values = {s["series"]: s["values"] for s in series}
        rx = 'job="vcan-plugin", instance="10.0.0.1:9720", node="n1", namespace="ns", pod="ecu", interface="vcan0", direction="rx"'
        # Every kind is exported, at 0 when there is no traffic; no id_format on the kind counters.
        self.assertEqual(values[f'vcan_plugin_can_frames_total{{{rx}, kind="xl"}}'], "0+0x20")
        self.assertEqual(values[f'vcan_plugin_can_bytes_total{{{rx}, kind="fd"}}'], "0+19200x20")
        # Error frames have no ID format: 15 frames/s with one, 4 of them extended.
        self.assertEqual(values[f'vcan_plugin_can_id_format_frames_total{{{rx}, id_format="standard"}}'], "0+660x20")
        self.assertEqual(values[f'vcan_plugin_can_id_format_frames_total{{{rx}, id_format="extended"}}'], "0+240x20")
        self.assertEqual(len(series), 2 * (2 * len(cm.CAN_KINDS) + 2))
        for s in series:
            self.assertEqual(cm.label_problems(s["series"]), [])

    def test_more_extended_frames_than_frames(self) -> None:
        with self.assertRaises(ValueError):
            cm.bus_load_input_series("vcan0", {"classic": (10, 80), "error": (50, 400)}, 20)


if __name__ == "__main__":
    unittest.main()
