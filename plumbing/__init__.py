"""Plumbing: what the algorithm scripts need to run but a reader of the algorithm may skip. runs.py (command line,
run directory, logs, checkpoints, resume), models.py (loading models: hub names, local directories, the offline GGUF
model, LoRA, mixed precision), parallel.py (data-parallel processes under accelerate launch), decoding.py (the token
loops behind every sampler) and guides.py (guides that continue text: served models, other tokenizers).

Here: the error a user can fix, printed by runs.cli as one line (no traceback) with exit status 2, and one setting of
the C allocator that runs on CPU make (return_freed_memory, called by parallel.device_of)."""

import ctypes
import os
import sys

MMAP_THRESHOLD = 512 * 1024  # bytes: a CPU tensor at least this large gets its own pages, handed back when freed


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
    from its heap, whose holes it keeps: on CPU the process grew by about 0.45 GiB over the first steps
    (grpo.py at benchmark/peers.py's sizes: peak RSS 3.17 GiB without, 2.72 GiB with; the loop about 10% slower
    for the page faults).
    Set MALLOC_MMAP_THRESHOLD_ in the environment to choose another value (glibc reads it at start); elsewhere (macOS,
    Windows) nothing changes. Returns whether it was set."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    m_mmap_threshold = -3  # glibc's malloc.h
    return bool(mallopt and mallopt(m_mmap_threshold, threshold))
