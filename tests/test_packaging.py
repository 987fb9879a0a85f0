"""What pip sees of Fareway: the Pythons it installs on, and the bounds on libraries whose private
parts it uses."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

PROJECT = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]


def test_it_installs_on_every_current_python_from_3_11() -> None:
    supported = SpecifierSet(PROJECT["requires-python"])
    assert all(version in supported for version in ("3.11.7", "3.12.1", "3.13.0", "3.14.0"))
    assert "3.10.13" not in supported


def test_libraries_used_through_private_parts_are_bounded_above() -> None:
    """fareway/redis/redis_py.py uses private parts of redis-py, and workers/layers of torch (its
    int8 kernels): a release that moves them must not install unasked."""
    requirements = {r.name: r for r in map(Requirement, PROJECT["dependencies"])}
    for name in ("redis", "torch", "grpcio-tools"):
        assert any(spec.operator in ("<", "<=", "==", "~=") for spec in requirements[name].specifier), name
