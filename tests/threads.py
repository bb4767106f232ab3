"""Running one job in several threads at once, for the tests of thread safety."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_in_threads(job: Callable[[int], None], n: int, what: str) -> list[BaseException]:
    """Run ``job(0)`` ... ``job(n - 1)`` in ``n`` threads and wait for them (60 s each): the errors they raised.

    Fails the test when a thread is still running after its wait ("a ``what`` thread hung (deadlock?)").
    """
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            job(i)
        except BaseException as exc:  # reported to the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), f"a {what} thread hung (deadlock?)"
    return errors
