"""The one exception type that reaches users as a single line instead of a traceback, and the checks
that raise it for settings."""

from __future__ import annotations

from collections.abc import Iterable


class UserError(Exception):
    """Bad input or settings: the message names the file or setting and how to fix it."""


def check_choice(setting: str, value: object, choices: Iterable[object]) -> None:
    """Refuse a setting whose value is not one of its choices, naming them."""
    choices = tuple(choices)
    if value not in choices:
        raise UserError(f"{setting}={value!r} is not one of {', '.join(map(str, choices))}")


def check_number(
    setting: str,
    value: object,
    minimum: float | None = None,
    maximum: float | None = None,
    integer: bool = False,
    exclusive_minimum: bool = False,
) -> None:
    """Refuse a numeric setting that is not a number, or lies outside [minimum, maximum]."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an integer" if integer else "a number"
        raise UserError(f"{setting}={value!r} must be {what}")
    low_ok = minimum is None or (value > minimum if exclusive_minimum else value >= minimum)
    if not low_ok or (maximum is not None and value > maximum):
        low = f"> {minimum}" if exclusive_minimum else f">= {minimum}"
        bounds = " and ".join(
            part
            for part in (
                low if minimum is not None else "",
                f"<= {maximum}" if maximum is not None else "",
            )
            if part
        )
        raise UserError(f"{setting}={value!r} must be {bounds}")
