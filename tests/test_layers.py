"""The layering contract (pyproject.toml, [tool.importlinter]): the library never imports a driver or the CLI."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))


def lint_imports(root: Path, config: Path) -> subprocess.CompletedProcess:
    # lint-imports builds its graph from the package found on the path, so the copy under test goes first.
    return subprocess.run([LINT_IMPORTS, "--config", str(config), "--no-cache"], cwd=root, capture_output=True,
                          text=True, env={"PYTHONPATH": str(root), "PATH": str(Path(sys.executable).parent)})


def test_the_library_imports_no_driver():
    # Given this checkout, When its contract is checked, Then it is kept
    result = lint_imports(REPO, REPO / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 1 kept, 0 broken." in result.stdout


def test_a_library_module_that_imports_a_driver_breaks_the_contract(tmp_path):
    # Given a copy of the package in which a library module imports the train driver
    shutil.copytree(REPO / "denseqa", tmp_path / "denseqa", ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "denseqa" / "texts.py", "a") as f:
        f.write("\nfrom denseqa.drivers.train import run_training  # noqa: E402,F401\n")
    config = tmp_path / "importlinter.toml"
    config.write_text((REPO / "pyproject.toml").read_text())
    assert "importlinter" in tomllib.loads(config.read_text())["tool"]
    # When the contract is checked, Then it is broken, naming the import
    result = lint_imports(tmp_path, config)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Contracts: 0 kept, 1 broken." in result.stdout
    assert "denseqa.texts -> denseqa.drivers.train" in result.stdout
