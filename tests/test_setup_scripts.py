"""The set-up scripts: what the demo installs, what only the tests install, and the choice of PyTorch build."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"


def listed(name: str) -> list[str]:
    lines = (SCRIPTS / name).read_text().splitlines()
    return [s.strip() for s in lines if s.strip() and not s.startswith("#")]


def test_the_demo_does_not_install_the_tests_browser():
    """The browser and its driver are the tests' (report page, editor): in the test list only, which test.sh installs
    and bootstrap.sh (the demo's set-up) does not."""
    assert not {"chromium", "chromium-driver"} & set(listed("apt-packages.txt"))
    assert {"chromium", "chromium-driver"} <= set(listed("apt-packages-test.txt"))
    assert "dataset-fashion-mnist" in listed("apt-packages.txt")  # the demo's own needs stay
    installs_test_list = re.compile(r"^\s*install_apt_list\s+\S*apt-packages-test\.txt", re.M)
    assert installs_test_list.search((SCRIPTS / "test.sh").read_text())
    for script in ("bootstrap.sh", "demo.sh"):
        assert not installs_test_list.search((SCRIPTS / script).read_text())


@pytest.mark.parametrize("script", ["bootstrap.sh", "demo.sh", "test.sh", "fetch_assets.sh"])
def test_scripts_parse(script):
    r = subprocess.run(["bash", "-n", str(SCRIPTS / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_an_unknown_torch_choice_stops_before_anything_is_installed(tmp_path):
    """CYCLE_ENCODING_TORCH takes auto, cpu or pypi; anything else is refused before a virtual environment is made
    (the Debian packages before it are only checked: all are installed where the suite runs)."""
    if any(subprocess.run(["dpkg", "-s", p], capture_output=True).returncode for p in listed("apt-packages.txt")):
        pytest.skip("a Debian package of scripts/apt-packages.txt is missing: bootstrap.sh would install it")
    venv = tmp_path / "venv"
    env = {**os.environ, "CYCLE_ENCODING_TORCH": "gpu", "CYCLE_ENCODING_VENV": str(venv)}
    r = subprocess.run(["bash", str(SCRIPTS / "bootstrap.sh")], capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert "CYCLE_ENCODING_TORCH must be auto, cpu or pypi, not 'gpu'" in r.stderr
    assert not venv.exists()


@pytest.mark.parametrize("given", [None, "ACTIVE"])
def test_openmp_threads_sleep_while_waiting_unless_the_user_chose(given):
    """The package sets OMP_WAIT_POLICY=PASSIVE before torch loads libgomp (which reads it then), and keeps a value
    the user gave; torch's OpenMP runtime is the one it configures (GNU libgomp, shipped in torch/lib)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = (
        "import cycle_encoding, os, torch, pathlib; print(os.environ['OMP_WAIT_POLICY']); "
        "print(sorted(p.name for p in (pathlib.Path(torch.__file__).parent / 'lib').glob('lib*omp*')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    policy, libs = r.stdout.splitlines()
    assert policy == (given or "PASSIVE")
    assert libs == "[]" or "libgomp" in libs  # a build without a bundled OpenMP runtime has nothing to set
