"""The documentation tells the truth about the code: the reference is generated from the
declarations and must be current; every log call is declared (at its level); links resolve; the
configuration examples load."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

from tiktokguard.config import ConfigError, load_config
from tiktokguard.logs import EVENTS
from tiktokguard.reference import render

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_reference_is_generated_from_the_code_and_current() -> None:
    committed = (ROOT / "docs" / "reference.md").read_text()
    assert committed == render(), (
        "docs/reference.md is stale: python -m tiktokguard.reference > docs/reference.md")


def _log_calls() -> list[tuple[str, str, str]]:
    """(event, level, where) of every `log.<level>("event", ...)` in the package."""
    calls = []
    for path in (ROOT / "tiktokguard").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "log"
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)):
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                calls.append((node.args[0].value, node.func.attr, where))
    return calls


def test_every_log_event_is_declared_at_the_level_it_is_logged() -> None:
    calls = _log_calls()
    assert len(calls) > 25
    undeclared = [(e, w) for e, _level, w in calls if e not in EVENTS]
    assert undeclared == [], "add them to tiktokguard.logs.EVENTS"
    wrong_level = [(e, level, w) for e, level, w in calls if EVENTS[e][0] != level]
    assert wrong_level == []
    never_logged = set(EVENTS) - {e for e, _level, _w in calls}
    assert never_logged == set(), "declared but never logged"


def test_relative_links_in_the_docs_lead_somewhere() -> None:
    broken = []
    for doc in DOCS:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue  # (no external links are checked: tests stay on loopback)
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                broken.append(f"{doc.name}: {target}")
                continue
            if anchor and file.suffix == ".md":
                headings = {_slug(h) for h in re.findall(r"(?m)^#+ (.+)$", file.read_text())}
                if anchor not in headings:
                    broken.append(f"{doc.name}: {target} (no such heading)")
    assert broken == []


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def test_docs_never_point_outside_the_repository() -> None:
    for doc in DOCS:
        assert "shared/" not in doc.read_text(), doc.name


def test_the_readme_installs_the_system_packages_ci_installs() -> None:
    """The README's list of what the skipped tests need is the one .ci/run installs."""
    def packages(text: str) -> set[str]:
        joined = text.replace("\\\n", " ")  # shell line continuations
        line = re.search(r"apt-get install -y\S* .*--no-install-recommends(.*)", joined)
        assert line is not None
        return set(line.group(1).split()) - {">/dev/null", "-qq"}

    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci/run").read_text()
    assert packages(readme) == packages(ci)
    assert "npm install --no-save axe-core@4" in readme and "axe-core@4" in ci


def test_the_code_cites_design_sections_that_exist() -> None:
    """`docs/design.md §N` in a comment or docstring names a section of docs/design.md, and the
    code cites no design outside the repository."""
    sections = set(re.findall(r"(?m)^## §(\d+) ", (ROOT / "docs/design.md").read_text()))
    wrong = []
    for source in sorted((ROOT / "tiktokguard").rglob("*.py")) + sorted(
            (ROOT / "tests").glob("*.py")):
        text = source.read_text()
        for number in re.findall(r"docs/design\.md §(\d+)", text):
            if number not in sections:
                wrong.append(f"{source.relative_to(ROOT)}: §{number}")
        if re.search(r"\bDESIGN(\.md)? §", text):
            wrong.append(f"{source.relative_to(ROOT)}: cites DESIGN, not docs/design.md")
    assert sections and wrong == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_configuration_examples_in_the_docs_load(doc: Path, tmp_path: Path) -> None:
    for block in re.findall(r"```toml\n(.*?)```", doc.read_text(), re.S):
        parsed = tomllib.loads(block)  # every snippet is TOML
        if "dns" not in parsed:
            continue  # a fragment (a token table with placeholders)
        path = tmp_path / "example.toml"
        path.write_text(block)
        try:
            load_config(path)
        except ConfigError as exc:
            if "No such file or directory" in str(exc):
                continue  # (a deployment's own files, e.g. its certificate: not here)
            pytest.fail(f"{doc.name}: {exc}")
