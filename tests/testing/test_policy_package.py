"""A policy author's path, end to end: examples/policy_package built and installed by pip, its
policy found through its ``relibra.policies`` entry point, its three-line pytest file run.

pip installs a copy of the package (no dependencies, no build isolation, no index: nothing is
downloaded) into a temporary directory put on PYTHONPATH of the subprocesses only, so the test
environment itself is left as it was. The examples run with a fixed hypothesis seed, as CI's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "policy_package"
TEST_FILE = EXAMPLE / "tests" / "test_snake.py"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(a copy of the package's source, the directory pip installed it into)."""
    root = tmp_path_factory.mktemp("policy_package")
    source, site = root / "source", root / "site"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".*"))
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
           "--target", str(site), str(source)]
    result = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return source, site


def run(args: list[str], cwd: Path, site: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_installed_policy_is_found_through_its_entry_point(installed, tmp_path):
    _, site = installed
    code = ("import sys, relibra; policy = relibra.get_policy('snake'); "
            "print(sys.modules[type(policy).__module__].__file__); print('snake' in relibra.available_policies())")
    result = run(["-c", code], tmp_path, site)
    assert result.returncode == 0, result.stderr
    module_file, listed = result.stdout.split()
    assert Path(module_file).is_relative_to(site) and listed == "True"  # the installed copy, not the source


def test_its_three_line_test_file_passes(installed):
    source, site = installed
    assert len([line for line in TEST_FILE.read_text().splitlines() if line.strip()]) == 3
    result = run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--hypothesis-seed=0"], source, site)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_its_test_file_fails_when_the_installed_policy_breaks(installed, tmp_path):
    """The same test file against an installed build whose plan loses a token: check_policy catches it."""
    source, site = installed
    broken_site = tmp_path / "site"
    shutil.copytree(site, broken_site)
    module = broken_site / "relibra_snake" / "__init__.py"
    text = module.read_text()
    last_line = "        return Plan.without_replicas(placement, loads_MLE, topology, policy=\"snake\")\n"
    assert last_line in text
    module.write_text(text.replace(last_line, last_line.replace("loads_MLE,", "loads_MLE.clamp(max=7),")))
    result = run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--hypothesis-seed=0"], source, broken_site)
    assert result.returncode != 0
    assert "[loads-conserved] policy 'snake'" in result.stdout, result.stdout + result.stderr
