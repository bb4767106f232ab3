"""The figures of the reliability run, counted as the tests run (printed at the end of the session)."""

from __future__ import annotations

from collections import Counter

#: fault kinds injected whose outcome was verified (kind -> how it was injected)
FAULTS: dict[str, str] = {}
#: property-test examples run, per test
EXAMPLES: Counter[str] = Counter()
#: how many times a model's full state was compared with its state before a failure or undo
STATE_CHECKS: list[int] = [0]
#: what the random examples contained (quantized kinds, ties, shared modules, refused policies)
COVERAGE: Counter[str] = Counter()
#: descriptions of every partial state found (a model left neither as before nor fully prepared)
PARTIAL: list[str] = []


def fault(kind: str, how: str) -> None:
    """Record that fault ``kind`` was injected and its outcome verified."""
    FAULTS[kind] = how


def example(test: str) -> None:
    """Record one property-test example of ``test``."""
    EXAMPLES[test] += 1


def state_checked(same: bool, what: str) -> None:
    """Record one before/after state comparison; a difference is a partial state."""
    STATE_CHECKS[0] += 1
    if not same:
        PARTIAL.append(what)
