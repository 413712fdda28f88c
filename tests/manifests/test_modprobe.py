"""Tests of deploy/modprobe-vcan.sh, the init container's script, with stub modprobe and uname."""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
import unittest
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "modprobe-vcan.sh"
RELEASE = "6.8.0-1015-azure"


class ModprobeVcan(unittest.TestCase):
    def run_script(self, modprobe_body: str, loaded=(), modules_tree=True, env=None):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            bin_dir = tmp / "bin"
            bin_dir.mkdir()
            for name, body in (("modprobe", modprobe_body), ("uname", f'echo "{RELEASE}"')):
                path = bin_dir / name
                path.write_text(f"#!/bin/sh\n{body}\n")
                path.chmod(path.stat().st_mode | stat.S_IEXEC)
            sys_module = tmp / "sys-module"
            sys_module.mkdir()
            for module in loaded:
                (sys_module / module).mkdir()
            modules = tmp / "lib-modules"
            if modules_tree:
                (modules / RELEASE).mkdir(parents=True)
            full_env = {
                "PATH": f"{bin_dir}:/usr/bin:/bin",
                "MODULES_DIR": str(modules),
                "SYS_MODULE_DIR": str(sys_module),
                **(env or {}),
            }
            proc = subprocess.run(
                ["sh", str(SCRIPT)], env=full_env, capture_output=True, text=True, timeout=30
            )
            return proc.returncode, proc.stdout + proc.stderr

    def test_loads_modules(self) -> None:
        code, out = self.run_script('echo "loading $1" >/dev/null; exit 0')
        self.assertEqual(code, 0, out)
        self.assertIn("vcan: loaded", out)
        self.assertIn("can_raw: loaded", out)
        self.assertIn("done", out)

    def test_already_loaded_modules_are_not_reloaded(self) -> None:
        code, out = self.run_script("echo called >&2; exit 1", loaded=("vcan", "can", "can_raw"))
        self.assertEqual(code, 0, out)
        self.assertNotIn("called", out)
        self.assertIn("vcan: already loaded", out)

    def test_missing_vcan_explains_linux_modules_extra_and_fails(self) -> None:
        code, out = self.run_script(
            f'echo "modprobe: FATAL: Module $1 not found in directory /lib/modules/{RELEASE}" >&2; exit 1'
        )
        self.assertEqual(code, 1, out)
        self.assertIn(f"linux-modules-extra-{RELEASE}", out)
        self.assertIn("ON THE NODE", out)
        self.assertIn("Module vcan not found", out)
        self.assertNotIn("apt-get install -y", out)

    def test_missing_optional_module_is_not_fatal(self) -> None:
        code, out = self.run_script('[ "$1" = can_raw ] && exit 1; exit 0')
        self.assertEqual(code, 0, out)
        self.assertIn("can_raw: optional, continuing", out)

    def test_missing_module_tree_is_explained(self) -> None:
        code, out = self.run_script("exit 1", modules_tree=False)
        self.assertEqual(code, 1, out)
        self.assertIn("lib-modules", out)

    def test_refusal_is_explained(self) -> None:
        code, out = self.run_script('echo "modprobe: ERROR: could not insert \'vcan\': Operation not permitted" >&2; exit 1')
        self.assertEqual(code, 1, out)
        self.assertIn("CAP_SYS_MODULE", out)
        self.assertIn("modules-load.d", out)

    def test_nothing_required(self) -> None:
        code, out = self.run_script("exit 1", env={"VCAN_REQUIRED_MODULES": ""})
        self.assertEqual(code, 0, out)


if __name__ == "__main__":
    unittest.main()
