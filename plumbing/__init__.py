"""Plumbing: what the algorithm scripts need to run but a reader of the algorithm may skip. runs.py (command line,
run directory, logs, checkpoints, resume), models.py (loading models: hub names, local directories, the offline GGUF
model, LoRA, mixed precision), parallel.py (data-parallel processes under accelerate launch), decoding.py (the token
loops behind every sampler) and guides.py (guides that continue text: served models, other tokenizers).

Here: the error a user can fix, printed by runs.cli as one line (no traceback) with exit status 2, and one setting of
the C allocator that runs on CPU make (return_freed_memory, called by parallel.device_of)."""

import contextlib
import ctypes
import os
import sys

MMAP_THRESHOLD = 512 * 1024  # bytes: a CPU tensor at least this large gets its own pages, handed back when freed
HEAP_UP_TO = 32 * 2**20  # glibc's own ceiling for its moving threshold: heap_allocation's value
_returning = False  # whether return_freed_memory is in force


class UserError(Exception):
    """A problem with the user's input or machine: runs.cli prints it as one line, no traceback, exit status 2."""


def check(condition, message):
    if not condition:
        raise UserError(message)


def check_probability(value, flag):
    check(0 <= value <= 1, f"{flag} must be in [0, 1], got {value}")


def return_freed_memory(threshold=MMAP_THRESHOLD):
    """On Linux (glibc), give every allocation of at least `threshold` bytes pages of its own (M_MMAP_THRESHOLD),
    returned to the system when the tensor is freed. By default glibc raises that threshold as it goes, up to 32 MB,
    so the activations and gradients that each minibatch allocates and frees (around 1 MB each for SmolLM2-135M) come
    from its heap, whose holes it keeps: grpo.py's peak RSS in `python benchmark/peers.py` (KL off) was 3.26 GiB
    without this (commit faeb493) and 2.75 GiB with it (commit 1e64890), TRL's 3.11. The price is a page fault per
    4 KB of each such allocation in the update; the decoding loops and the no-gradient passes, which keep nothing,
    run on the heap (heap_allocation).
    Set MALLOC_MMAP_THRESHOLD_ in the environment to choose another value (glibc reads it at start); elsewhere (macOS,
    Windows) nothing changes. Returns whether it was set."""
    global _returning
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    _returning = bool(_mallopt(threshold))
    return _returning


@contextlib.contextmanager
def heap_allocation():
    """Within it, allocations up to 32 MB come from glibc's heap again (no page faults), after return_freed_memory:
    for the decoding loops and the no-gradient passes, whose tensors (a few MB per step) are all freed by the end."""
    if not _returning:
        yield
        return
    _mallopt(HEAP_UP_TO, 2 * HEAP_UP_TO)  # glibc's own pair: the heap's free top is kept up to twice the threshold
    try:
        yield
    finally:
        _mallopt(MMAP_THRESHOLD)


def _mallopt(mmap_threshold, trim_threshold=128 * 1024):  # glibc's default trim threshold
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return mallopt is not None and mallopt(m_mmap_threshold, mmap_threshold) == 1 == mallopt(
        m_trim_threshold, trim_threshold
    )
