"""Data-parallel processes. `accelerate launch --num_processes N script.py` runs N copies of a script, each on its own
device and its own 1/N share of every batch; plain `python script.py` is the case N = 1, where every helper below
changes nothing. The scripts call them where a figure must be of the global batch (token means, whitening, logs)."""

import os

import torch

from plumbing import UserError, check, return_freed_memory


def _state():
    import accelerate

    return accelerate.PartialState(cpu=not torch.cuda.is_available())  # no GPU: gloo processes on the CPU


def processes():
    """(this process's index, the number of processes)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    state = _state()
    return state.process_index, state.num_processes


def is_main():
    return processes()[0] == 0


def data_parallel(*modules):
    """The trained modules (policy, value heads) wrapped by accelerate for data-parallel training (DDP): a backward pass
    through a wrapper averages the gradients over the processes. The same modules, unwrapped, in one process. Only the
    update's forward passes need the wrappers; sampling, scoring and checkpoints use the modules themselves."""
    if processes()[1] == 1:
        return modules
    import accelerate

    accelerator = accelerate.Accelerator(
        cpu=_state().device.type == "cpu", mixed_precision="no"
    )  # --dtype sets the precision
    kind = accelerator.distributed_type.value
    check(
        kind.startswith("MULTI_"),
        f"accelerate launch with {kind}: these scripts run data parallel (DDP) only; sharded "
        "models (FSDP, DeepSpeed) are not supported yet (sampling runs the unwrapped model)",
    )
    return tuple(None if m is None else accelerator.prepare_model(m) for m in modules)


def _ops():
    import accelerate.utils

    return accelerate.utils


def total(x):
    """A tensor summed over the processes (all-reduce)."""
    return _ops().reduce(x, "sum") if processes()[1] > 1 else x


def process_mean(x):
    """A tensor (or a dict of them) averaged over the processes."""
    return _ops().reduce(x, "mean") if processes()[1] > 1 else x


def gather(x):
    """Each process's tensor, concatenated along the first dimension in process order (the global batch)."""
    return _ops().gather(x) if processes()[1] > 1 else x


def gather_lists(x):
    """Each process's list, concatenated in process order."""
    return _ops().gather_object(x) if processes()[1] > 1 else x


def wait_for_everyone():
    if processes()[1] > 1:
        _state().wait_for_everyone()


def broadcast(value):
    """The main process's value, in every process."""
    return _ops().broadcast_object_list([value])[0] if processes()[1] > 1 else value


def device_of(name):
    """--device; under accelerate launch, the device accelerate gives this process (--device auto or its type). On CPU
    it also makes freed tensors' memory go back to the system (plumbing.return_freed_memory)."""
    if processes()[1] > 1:
        device = _state().device
        check(
            name in ("auto", device.type),
            f"--device {name}: under accelerate launch each process runs on the device accelerate gives it ({device}); "
            "leave --device at auto",
        )
        if device.type == "cpu":
            return_freed_memory()
        return device
    try:
        device = torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device {name}: not a torch device (auto, cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda":
        check(torch.cuda.is_available(), f"--device {name}: this machine has no CUDA GPU (use --device cpu or auto)")
        check((device.index or 0) < torch.cuda.device_count(), f"--device {name}: no such GPU here")
    if device.type == "cpu":
        return_freed_memory()
    return device
