"""Unit tests of kustomize_lite: golden outputs produced by kustomize itself, and its refusals."""

from __future__ import annotations

import tempfile
import textwrap
import unittest
from pathlib import Path

import yaml

import kustomize_lite as kl

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def write(directory: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


DEPLOYMENT = """\
    apiVersion: apps/v1
    kind: Deployment
    metadata:
      name: app
    spec:
      selector:
        matchLabels: {app: app}
      template:
        metadata:
          labels: {app: app}
        spec:
          containers:
            - name: app
              image: example.org/app:1
    """


class Goldens(unittest.TestCase):
    """Each fixtures/**/expected.yaml was rendered by kustomize (v5.5.0; v4.5.4 agrees)."""

    def test_goldens(self) -> None:
        goldens = sorted(FIXTURES.rglob("expected.yaml"))
        self.assertGreaterEqual(len(goldens), 4)
        for golden in goldens:
            with self.subTest(case=str(golden.parent.relative_to(FIXTURES))):
                expected = [d for d in yaml.safe_load_all(golden.read_text()) if d]
                self.assertEqual(kl.build(golden.parent), expected)

    def test_output_round_trips(self) -> None:
        rendered = kl.build(FIXTURES / "smp-lists")
        self.assertEqual([d for d in yaml.safe_load_all(kl.dump(rendered)) if d], rendered)


class Refusals(unittest.TestCase):
    def build(self, files: dict[str, str]) -> list:
        with tempfile.TemporaryDirectory() as tmp:
            write(Path(tmp), files)
            return kl.build(Path(tmp))

    def test_unknown_field_is_unsupported(self) -> None:
        with self.assertRaisesRegex(kl.Unsupported, "commonLabels"):
            self.build({"kustomization.yaml": "resources: [d.yaml]\ncommonLabels: {a: b}\n", "d.yaml": DEPLOYMENT})

    def test_patch_without_target_is_unsupported(self) -> None:
        k = """\
            resources: [d.yaml]
            patches:
              - patch: |-
                  apiVersion: apps/v1
                  kind: Deployment
                  metadata: {name: app}
                  spec: {replicas: 2}
            """
        with self.assertRaisesRegex(kl.Unsupported, "target"):
            self.build({"kustomization.yaml": k, "d.yaml": DEPLOYMENT})

    def test_unknown_list_strategy_is_unsupported(self) -> None:
        k = """\
            resources: [d.yaml]
            patches:
              - target: {kind: Deployment}
                patch: |-
                  apiVersion: apps/v1
                  kind: Deployment
                  metadata: {name: app}
                  spec:
                    template:
                      spec:
                        topologySpreadConstraints:
                          - {maxSkew: 1, topologyKey: zone, whenUnsatisfiable: DoNotSchedule}
            """
        original = DEPLOYMENT.replace(
            "      containers:",
            "      topologySpreadConstraints:\n"
            "            - {maxSkew: 2, topologyKey: host, whenUnsatisfiable: DoNotSchedule}\n"
            "          containers:",
        )
        with self.assertRaisesRegex(kl.Unsupported, "topologySpreadConstraints"):
            self.build({"kustomization.yaml": k, "d.yaml": original})
        # Where the original has no such list, the patch's simply becomes it (as in kustomize).
        rendered = self.build({"kustomization.yaml": k, "d.yaml": DEPLOYMENT})
        self.assertEqual(rendered[0]["spec"]["template"]["spec"]["topologySpreadConstraints"][0]["maxSkew"], 1)

    def test_target_selecting_nothing_fails(self) -> None:
        k = """\
            resources: [d.yaml]
            patches:
              - target: {kind: DaemonSet}
                patch: '[{"op": "add", "path": "/metadata/labels", "value": {}}]'
            """
        with self.assertRaisesRegex(kl.KustomizeError, "selects no resource"):
            self.build({"kustomization.yaml": k, "d.yaml": DEPLOYMENT})

    def test_failed_json_test_op_fails(self) -> None:
        k = """\
            resources: [d.yaml]
            patches:
              - target: {kind: Deployment}
                patch: '[{"op": "test", "path": "/spec/template/spec/containers/0/name", "value": "other"}]'
            """
        with self.assertRaisesRegex(kl.KustomizeError, "test failed"):
            self.build({"kustomization.yaml": k, "d.yaml": DEPLOYMENT})

    def test_duplicate_resource_fails(self) -> None:
        with self.assertRaisesRegex(kl.KustomizeError, "already registered"):
            self.build({"kustomization.yaml": "resources: [d.yaml, e.yaml]\n", "d.yaml": DEPLOYMENT, "e.yaml": DEPLOYMENT})

    def test_file_outside_root_fails(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            write(Path(tmp), {"d.yaml": DEPLOYMENT, "sub/kustomization.yaml": "resources: [../d.yaml]\n"})
            with self.assertRaisesRegex(kl.KustomizeError, "outside"):
                kl.build(Path(tmp) / "sub")

    def test_component_as_resource_fails(self) -> None:
        files = {
            "kustomization.yaml": "resources: [comp]\n",
            "comp/kustomization.yaml": "apiVersion: kustomize.config.k8s.io/v1alpha1\nkind: Component\n",
        }
        with self.assertRaisesRegex(kl.KustomizeError, "expected a Kustomization"):
            self.build(files)


class Images(unittest.TestCase):
    def test_split_like_kustomize(self) -> None:
        self.assertEqual(kl.split_image("nginx"), ("nginx", "", ""))
        self.assertEqual(kl.split_image("nginx:1.2"), ("nginx", "1.2", ""))
        self.assertEqual(kl.split_image("localhost:5000/a/b"), ("localhost:5000/a/b", "", ""))
        self.assertEqual(kl.split_image("localhost:5000/a/b:t"), ("localhost:5000/a/b", "t", ""))
        self.assertEqual(kl.split_image("a/b@sha256:00"), ("a/b", "", "sha256:00"))
        self.assertEqual(kl.split_image("a/b:t@sha256:00"), ("a/b", "t", "sha256:00"))


if __name__ == "__main__":
    unittest.main()
