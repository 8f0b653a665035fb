"""Packaging: `pip install .` must carry every subpackage and the bundled lists."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_in_pyproject() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts)
             for init in (ROOT / "tiktokguard").rglob("__init__.py")}
    assert found <= listed, f"missing from [tool.setuptools] packages: {sorted(found - listed)}"
    assert setuptools["package-dir"]["tiktokguard.blocklists"] == "blocklists"
    assert (ROOT / "blocklists" / "tiktok-bytedance.txt").is_file()
