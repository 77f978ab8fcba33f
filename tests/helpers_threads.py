"""Running a test's function in several threads at once."""

from __future__ import annotations

import threading


def run_in_threads(fn, n: int) -> list[Exception]:
    """Run ``fn`` in ``n`` threads started together and wait for all; the exceptions they raised, [] if none."""
    errors: list[Exception] = []

    def guarded():
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - returned to the caller's assertion
            errors.append(exc)

    threads = [threading.Thread(target=guarded) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def run_together(*fns, timeout: float = 60) -> None:
    """Run each of ``fns`` in a thread of its own, started together; fail if one is still running after
    ``timeout`` seconds (a deadlock). What the functions raise is theirs to record (pytest prints it)."""
    threads = [threading.Thread(target=fn) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread is stuck"
