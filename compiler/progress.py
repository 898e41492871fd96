"""Progress lines for long steps (calibration, sensitivity sweeps), on a terminal only.

The CLI turns them on when stderr is a TTY and ``--quiet`` is not given; library
use and pipes (CI logs) stay silent. A step asks for a callback with
:func:`bar` and calls it with (done, total); the line is redrawn in place and
ended when done reaches total.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

ENABLED = False


def enable(on: bool) -> None:
    global ENABLED
    ENABLED = bool(on) and sys.stderr.isatty()


def bar(desc: str) -> Callable[[int, int], None] | None:
    if not ENABLED:
        return None
    t0 = time.perf_counter()
    last = [0.0]

    def update(done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and now - last[0] < 0.1:
            return
        last[0] = now
        width = 24
        filled = int(width * done / max(total, 1))
        sys.stderr.write(f"\r{desc:<18} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {now - t0:5.1f}s")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return update
