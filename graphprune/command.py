"""The ``graphprune`` command's entry point, kept light: Ctrl-C while the heavy modules load
(onnx, ONNX Runtime: two to three seconds on a cold start) ends in the one line any other
interruption gives, not in Python's traceback of the import under way."""

from __future__ import annotations

import json
import os
import signal
import sys


def guarded_main() -> int:
    try:
        from graphprune.cli import guarded_main as run
    except KeyboardInterrupt:
        if "--json" in sys.argv[1:]:
            print(json.dumps({"error": "interrupted", "exit_code": 130, "type": "KeyboardInterrupt"}))
        else:
            print("graphprune: error: interrupted", file=sys.stderr)
        return 130
    return run(blame=input_crashes)


def input_crashes() -> str | None:
    """After a crash whose line names no model: the message where the model given crashes ONNX
    Runtime by itself, loaded and run once on generated inputs in a child of its own
    (:func:`graphprune.crash_guard.crashes_alone`; an fp16 converter's LSTMs had exited 1)."""
    from graphprune import crash_guard
    from graphprune.cli import build_parser

    try:
        args, _ = build_parser().parse_known_args(sys.argv[1:])
    except SystemExit:
        return None
    path = getattr(args, "model", None)
    if not isinstance(path, str) or not path.endswith(".onnx") or not os.path.isfile(path):
        return None

    def run_alone() -> None:
        import onnx

        from graphprune.io.feeds import make_feeds
        from graphprune.verify import validate

        validate.run(path, make_feeds(onnx.load(path, load_external_data=False)), "the model given")

    signum = crash_guard.crashes_alone(run_alone)
    if signum is None:
        return None
    return (f"ONNX Runtime crashed ({signal.Signals(signum).name}) loading and running the model given on its "
            "own: the input model does not run in ONNX Runtime; nothing was written")
