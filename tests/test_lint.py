"""The code base stays ruff- and mypy-clean: part of the test command, as CI runs it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_clean() -> None:
    beside = Path(sys.executable).parent / "ruff"  # the venv's, even when it is not on PATH
    ruff = str(beside) if beside.exists() else shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' brings it)")
    result = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_clean() -> None:
    """mypy over tiktokguard/ with the settings in pyproject.toml ([tool.mypy])."""
    if shutil.which("mypy", path=str(Path(sys.executable).parent)) is None and \
            shutil.which("mypy") is None:
        pytest.skip("mypy is not installed (pip install -e '.[test]' brings it)")
    result = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_log_event_is_in_the_readme() -> None:
    """Admins and the SOC filter journald by event name: every event the code logs is named in
    README.md's Logs section."""
    import ast

    events = set()
    for path in (ROOT / "tiktokguard").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "log"
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                events.add(node.args[0].value)
    readme = (ROOT / "README.md").read_text()
    logs = readme[readme.index("## Logs"):readme.index("## Campus deployment")]
    assert len(events) > 20
    assert {e for e in events if f"`{e}`" not in logs} == set()
