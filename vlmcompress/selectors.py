"""Module selectors shared by stages: exact module names, or `re:<regex>` matched against the full name."""

from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import NoMatchingModulesError, closest


def matches(selector: str, name: str) -> bool:
    if selector.startswith("re:"):
        return re.fullmatch(selector[3:], name) is not None
    return selector == name


def check_selectors(selectors: Iterable[str], names: list[str], key: str) -> None:
    """Raise `NoMatchingModulesError` for a selector that matches none of `names`."""
    for selector in selectors:
        if selector.startswith("re:"):
            try:
                re.compile(selector[3:])
            except re.error as e:
                raise NoMatchingModulesError(f"{key}: {selector!r} is not a valid regular expression ({e})") from None
        if not any(matches(selector, n) for n in names):
            near = closest(selector.removeprefix("re:"), names)
            hint = f"; closest module names: {', '.join(near)}" if near else ""
            raise NoMatchingModulesError(
                f"{key}: selector {selector!r} matches no module{hint}; "
                "use an exact name from `vlmcompress inspect MODEL` or a 're:' regex"
            )
