"""The whole conformance campaign: ONNX's node test cases through onnxcc's CLI, counted by outcome.

    python -m benchmarks.conformance [--commands fold,quantize,prune,lossless]
        [--variants shipped,first-input,frozen] [--every K] [--no-data] [--log out.jsonl]

Each case, variant and command is sorted by ``onnxcc.models.conformance.classify`` (ok, wrong,
refused, crash, unrunnable); the table gives the counts per command and variant, and every
``wrong`` or ``crash`` is printed with its case. ``--no-data`` verifies on onnxcc's own random
inputs instead of the case's (how a user without data runs it). The test suite runs a sample of
the same campaign (tests/reliability/test_conformance.py).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import io
import json
import logging
import sys
from typing import Iterator, Sequence

from onnxcc.models.conformance import COMMANDS, VARIANTS, Outcome, Runner, cases, classify


def in_process_runner() -> Runner:
    """Run the CLI in this process (as a user's shell would, exit code and stderr)."""
    from onnxcc.compiler.cli import main

    def run(args: Sequence[str]) -> tuple[int, str]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                main(list(args))
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return code, err.getvalue()

    return run


def campaign(commands: Sequence[str] = COMMANDS, variants: Sequence[str] = VARIANTS, *, every: int = 1,
             with_data: bool = True) -> Iterator[Outcome]:
    run = in_process_runner()
    for i, case in enumerate(cases()):
        if i % every:
            continue
        for kind in variants:
            for command in commands:
                yield classify(case, command, kind, run, with_data=with_data)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commands", default=",".join(COMMANDS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--every", type=int, default=1, help="every k-th case only")
    ap.add_argument("--no-data", action="store_true", help="verify on onnxcc's own random inputs, not the case's data")
    ap.add_argument("--log", help="write every outcome as JSON lines here")
    a = ap.parse_args(argv)
    logging.disable(logging.CRITICAL)
    counts: collections.Counter = collections.Counter()
    log = open(a.log, "w") if a.log else None
    for o in campaign(a.commands.split(","), a.variants.split(","), every=a.every, with_data=not a.no_data):
        counts[(o.command, o.variant, o.kind)] += 1
        if log:
            log.write(json.dumps(dataclasses.asdict(o)) + "\n")
            log.flush()
        if o.kind in ("wrong", "crash"):
            print(f"{o.kind}: {o.command} {o.variant} {o.case}: {o.detail}", file=sys.stderr)
    for (command, var) in sorted({(c, v) for c, v, _ in counts}):
        row = {k: counts[(command, var, k)] for k in ("ok", "wrong", "refused", "crash", "unrunnable")}
        print(f"{command:9s} {var:12s} " + " ".join(f"{k} {v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
