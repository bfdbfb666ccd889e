"""Plumbing: what the algorithm scripts need to run but a reader of the algorithm may skip. runs.py (command line,
run directory, logs, checkpoints, resume), models.py (loading models: hub names, local directories, the offline GGUF
model, LoRA, mixed precision), parallel.py (data-parallel processes under accelerate launch), decoding.py (the token
loops behind every sampler) and guides.py (guides that continue text: served models, other tokenizers).

Here: the error a user can fix, printed by runs.cli as one line (no traceback) with exit status 2."""


class UserError(Exception):
    """A problem with the user's input or machine: runs.cli prints it as one line, no traceback, exit status 2."""


def check(condition, message):
    if not condition:
        raise UserError(message)


def check_probability(value, flag):
    check(0 <= value <= 1, f"{flag} must be in [0, 1], got {value}")
