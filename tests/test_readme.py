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


def test_readme_yaml_snippet_is_the_tested_one():
    snippet = re.search(r"```yaml\n(.*?)```", README, flags=re.S).group(1)
    tested = (ROOT / "tests" / "test_suite.py").read_text()
    assert snippet.strip() in tested
