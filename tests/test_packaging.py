"""Packaging (issue 17, point 9): the dependency floors in pyproject.toml are no lower than what the installed
transformers itself requires, and `[all]` holds every backend extra."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


def _floor(requirement: Requirement) -> Version | None:
    floors = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==", "~=")]
    return max(floors) if floors else None


def test_floors_are_at_least_what_transformers_needs():
    ours = {Requirement(r).name.lower().replace("_", "-"): Requirement(r) for r in PYPROJECT["project"]["dependencies"]}
    theirs = {}
    for text in importlib.metadata.requires("transformers"):
        req = Requirement(text)
        extra = req.marker is not None and "extra" in str(req.marker)
        if extra and not re.search(r'extra == "torch"', str(req.marker)):
            continue
        theirs[req.name.lower().replace("_", "-")] = req
    checked = 0
    for name, req in ours.items():
        if name in theirs and _floor(theirs[name]) is not None:
            assert _floor(req) is not None and _floor(req) >= _floor(theirs[name]), (name, str(req), str(theirs[name]))
            checked += 1
    assert checked >= 4  # torch, safetensors, huggingface-hub, numpy, PyYAML at least


def test_all_extra_holds_every_backend():
    extras = PYPROJECT["project"]["optional-dependencies"]
    backends = set(extras) - {"all", "dev", "docs"}  # docs: the site builder, not a backend
    (all_extra,) = extras["all"]
    assert set(re.search(r"\[(.*)\]", all_extra).group(1).split(",")) == backends
