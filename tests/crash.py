"""Run a script as `python SCRIPT FLAGS...` would, killing it with SIGKILL at a chosen point (tests/test_runs.py):

    python tests/crash.py POINT COUNT SCRIPT FLAGS...

POINT: none, update (the COUNT-th forward pass: mid-iteration), log (right after the COUNT-th metrics row), state (the
COUNT-th checkpoint, its weights written, its training state not), swap (the COUNT-th checkpoint swap, the old one
moved aside, the new one not yet in place), cleanup (right after the COUNT-th swap, the old one not yet removed)."""

import os
import runpy
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import common  # noqa: E402
from plumbing import runs  # noqa: E402

point, count, script = sys.argv[1], int(sys.argv[2]), sys.argv[3]
hits = 0


def wrap(owner, name, when, before=False):
    """Kill the process at the COUNT-th call of owner.name for which when(*args) holds, before or after it runs."""
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        global hits
        hit = when(*args)
        hits += hit
        if hit and before and hits == count:
            os.kill(os.getpid(), signal.SIGKILL)
        out = original(*args, **kwargs)
        if hit and not before and hits == count:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(owner, name, wrapped)


if point == "update":
    wrap(common, "forward", lambda *a: torch.is_grad_enabled())
elif point == "log":
    wrap(runs.Logger, "log", lambda *a: True)
elif point == "state":
    wrap(torch, "save", lambda obj, path: str(path).endswith("training_state.pt.part"), before=True)
elif point == "swap":
    wrap(os, "replace", lambda src, dst: str(dst).endswith("checkpoint.old"))
elif point == "cleanup":
    wrap(os, "replace", lambda src, dst: str(src).endswith("checkpoint.tmp"))
sys.argv = [script, *sys.argv[4:]]
runpy.run_path(script, run_name="__main__")
