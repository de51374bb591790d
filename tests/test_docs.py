"""The documents agree with the code: every setting is in .env.example and in the README's
configuration table with its true default, and every test docs/faults.md names exists."""

from __future__ import annotations

import ast
import re
from dataclasses import MISSING, fields

import pytest

from aggregator import Config
from conftest import ROOT

SETTINGS = [(f.name.upper(), f.default) for f in fields(Config)]


def shown_default(default) -> str:
    """How the README's table writes a default."""
    return "required" if default is MISSING else "none" if default == "" else str(default)


@pytest.mark.parametrize("name, default", SETTINGS, ids=[name for name, _ in SETTINGS])
def test_every_setting_is_in_env_example_with_its_default(name, default):
    found = re.search(rf"^#? ?{name}=(\S*)", (ROOT / ".env.example").read_text(), re.MULTILINE)

    assert found, f"{name} is not in .env.example"
    if default not in (MISSING, ""):  # the others show a placeholder to replace
        assert found.group(1) == str(default), f".env.example says {name}={found.group(1)}"


@pytest.mark.parametrize("name, default", SETTINGS, ids=[name for name, _ in SETTINGS])
def test_every_setting_is_in_the_readmes_table_with_its_default(name, default):
    row = re.search(rf"^\| `{name}` \| ([^|]+) \|", (ROOT / "README.md").read_text(), re.MULTILINE)

    assert row, f"{name} has no row in the README's configuration table"
    assert row.group(1).strip() == shown_default(default)


def test_every_test_the_fault_table_names_exists():
    named = re.findall(r"`(test_\w+)::(test_\w+)`", (ROOT / "docs" / "faults.md").read_text())
    defined = {
        (path.stem, node.name)
        for path in (ROOT / "tests").glob("test_*.py")
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.FunctionDef)
    }

    assert len(named) > 80
    assert [f"{file}::{test}" for file, test in named if (file, test) not in defined] == []
