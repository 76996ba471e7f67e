"""One exception type for every bad input, so the CLI can print one clear line and exit 2."""

from __future__ import annotations


class LossglassError(ValueError):
    """A bad input (path, shape, value, option) described in words a user can act on."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`LossglassError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise LossglassError(message)


def choice(name: str, value: str, options: tuple[str, ...] | list[str]) -> str:
    """Return ``value`` if it is one of ``options``, else raise naming the option and the valid set."""
    if value not in options:
        raise LossglassError(f"unknown {name} {value!r}; choose one of: {', '.join(map(str, options))}")
    return value
