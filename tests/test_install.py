"""README's set-up works on a stock python3: `python3 -m venv --upgrade-deps` replaces the old pip that Debian 12
(23.0.1) or Ubuntu 22.04 (22.0.2) puts in a new virtual environment, and the requirements file, whose build option
(`--config-settings`, to leave out the AMX kernel) needs pip 23.1, parses under every pip from 23.1 on; an old pip
refuses it aloud rather than build llama.cpp without the option."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements.txt"


@pytest.fixture(scope="module")
def old_pips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheels of pip 22.0.2, 23.0.1 and 23.1, fetched from PyPI once; pip runs straight from its wheel."""
    folder = tmp_path_factory.mktemp("pips")
    for version in ("22.0.2", "23.0.1", "23.1"):
        subprocess.run([sys.executable, "-m", "pip", "download", "--isolated", "--quiet", "--no-deps",
                        "--only-binary=:all:", f"pip=={version}", "-d", str(folder)], check=True, timeout=300)
    return folder


@pytest.mark.parametrize("version", ["22.0.2", "23.0.1", "23.1"])
def test_the_requirements_file_parses_from_pip_23_1_on_and_old_pips_refuse_it_aloud(old_pips, tmp_path, version):
    wheel = next(old_pips.glob(f"pip-{version}-*.whl"))
    # No index and an empty folder of links: pip reads the whole file, then finds nothing to install or build.
    empty = tmp_path / "no-packages"
    empty.mkdir()
    result = subprocess.run([sys.executable, str(wheel / "pip"), "install", "--isolated", "--no-index",
                             "--find-links", str(empty), "--target", str(tmp_path / "target"),
                             "-r", str(REQUIREMENTS)], capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    if version != "23.1":
        assert result.returncode != 0 and "no such option: --config-settings" in output, output
        return
    assert "Invalid requirement" not in output and "no such option" not in output, output
    assert "No matching distribution found for llama-cpp-python==0.3.36" in output, output
