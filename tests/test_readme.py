"""The README documents exactly what the code registers, and CI runs exactly the README's commands."""

import re
from pathlib import Path

from lightning_sentinel.catalog import default_action, registered_checks

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _table_rows():
    rows = {}
    for line in README.splitlines():
        match = re.match(r"^\| `([a-z0-9-]+)` \| (\w+) \|.*\| (\w+) \|$", line)
        if match:
            rows[match.group(1)] = (match.group(2), match.group(3))
    return rows


def test_readme_table_lists_exactly_the_registered_ids_with_their_callback_and_action():
    rows = _table_rows()
    registered = registered_checks()
    assert set(rows) == set(registered)
    for check, spec in registered.items():
        assert rows[check] == (spec.callback, default_action(spec)), check


def _bash_blocks():
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
    commands = [
        line for block in _bash_blocks() for line in block.splitlines() if line and not line.startswith("#")
    ]
    test_command = next(command for command in commands if "pytest" in command)
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines
    assert any("lightning-sentinel demo" in command for command in commands)


def test_readme_yaml_snippets_are_tested_ones():
    """Each YAML block is a piece of a config that a test parses (a test file or an example it runs)."""
    snippets = re.findall(r"```yaml\n(.*?)```", README, flags=re.S)
    assert len(snippets) >= 2
    tested = [(ROOT / "tests" / name).read_text() for name in ("test_suite.py", "test_lightning_cli.py")]
    tested += [path.read_text() for path in sorted((ROOT / "examples").glob("*.yaml"))]
    for snippet in snippets:
        assert any(snippet.rstrip() in source for source in tested), snippet


def test_readme_images_exist_and_stay_small():
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README)
    assert len(images) >= 4
    for image in images:
        path = ROOT / image
        assert path.is_file() and path.stat().st_size < 200_000, image


def test_readme_counts_the_registered_checks():
    assert f"{len(registered_checks())} checks, each with a stable id" in README


def test_readme_has_the_sections_a_user_looks_for():
    headings = re.findall(r"^## (.+)$", README, flags=re.M)
    for heading in (
        "Try it",
        "What it catches",
        "Add it to your training",
        "Configure it",
        "Read it",
        "The command line",
        "Checks",
        "Supported setups",
        "Cost",
        "Detection results",
    ):
        assert heading in headings, heading  # fmt: skip
