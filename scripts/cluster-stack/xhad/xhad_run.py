"""``python3 -S xhad_run.py <script> [args...]``: one xhad script run in this interpreter.

What every ``ha_*`` shim here runs when no fork server takes the run (see xhad_engine.py, "fork
server"); exit 127 (MTC_EXIT_INTERNAL_BUG) rather than a traceback's status 1 if the engine fails
to load.
"""

import os
import sys

try:
    sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
    import xhad_engine
except Exception:  # noqa: BLE001 - exit 127 (MTC_EXIT_INTERNAL_BUG), never traceback status 1
    import traceback

    traceback.print_exc()
    sys.exit(127)
if len(sys.argv) < 2:
    print("usage: xhad_run.py <script> [args...]", file=sys.stderr)
    sys.exit(xhad_engine.EXIT_INVALID_PARAMETER)
sys.exit(xhad_engine.main(sys.argv[1], sys.argv[2:]))
