"""The ``graphprune`` command's entry point, kept light: Ctrl-C while the heavy modules load
(onnx, ONNX Runtime: two to three seconds on a cold start) ends in the one line any other
interruption gives, not in Python's traceback of the import under way."""

from __future__ import annotations

import json
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
    return run()
