"""Progress for long steps (calibration, sensitivity sweeps, refits, GPTQ), drawn by tqdm.

The CLI turns progress on unless ``--quiet`` is given; library use stays silent. A step asks
for a callback with :func:`bar` and calls it with (done, total):

* on a terminal, a tqdm bar redrawn in place, with rate and ETA;
* without one (CI logs, pipes), a plain line every :data:`PLAIN_INTERVAL_S` seconds, no
  carriage returns, in tqdm's format (``calibration:  30%| 30/100 [00:12<00:29, 2.40it/s]``),
  and a last line when the step ends; a step shorter than the interval prints nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

ENABLED = False
PLAIN_INTERVAL_S = 5.0


def enable(on: bool) -> None:
    global ENABLED
    ENABLED = bool(on)


def bar(desc: str) -> Callable[..., None] | None:
    """A callback ``update(done, total, info="")`` (``info``: a short status shown after the bar,
    such as a training loss), or None when progress is off."""
    if not ENABLED:
        return None
    from tqdm import tqdm

    stream = sys.stderr
    if stream.isatty():
        state: dict = {}

        def update_tty(done: int, total: int, info: str = "") -> None:
            t = state.get("bar")
            if t is None:
                t = state["bar"] = tqdm(total=total, desc=desc, file=stream, leave=True, dynamic_ncols=True)
            t.total = total
            if info:
                t.set_postfix_str(info, refresh=False)
            t.update(done - t.n)
            if done >= total:
                t.close()

        return update_tty
    t0 = time.perf_counter()
    last = [t0, False]  # time of the last line, whether any was printed

    def update_plain(done: int, total: int, info: str = "") -> None:
        now = time.perf_counter()
        finished = done >= total
        if not finished and now - last[0] < PLAIN_INTERVAL_S:
            return
        if finished and not last[1]:
            return  # a short step: nothing to say
        last[0], last[1] = now, True
        line = tqdm.format_meter(done, total, now - t0, prefix=desc, ascii=True, ncols=80, postfix=info or None)
        stream.write(line.replace("\r", "") + "\n")
        stream.flush()

    return update_plain
