"""How the multi-process test scripts end (``exit_now``), after every rank wrote what it reports."""

from __future__ import annotations

import os
import sys


def exit_now(code: int = 0) -> None:
    """Leave without the interpreter's teardown. Everything this rank reports is written and all collectives
    are done; what remains is torch's gloo teardown, which races: a worker thread that still holds the last
    reference to a finished collective needs the GIL to free its tensors, and deadlocks against a main thread
    joining it in the process group's destructor, or aborts the rank ("terminate called without an active
    exception") when that happens during interpreter shutdown. Either fails the launch after the work is
    done; it is torch's, not what this test checks."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
