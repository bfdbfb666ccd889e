"""Peak memory of a run with full fine-tuning and with LoRA, each in its own process (the README's figures):

    python benchmark/memory.py                                  # ppo_pp.py, offline default, 1 iteration
    python benchmark/memory.py --script ppo --lora-r 8 -- --rollouts-per-iteration 16

Prints, per variant, the process's peak resident memory (CPU) and, on CUDA, the peak GPU memory torch allocated."""

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the script as `python SCRIPT ARGS` would, then prints its own peaks as one JSON line.
MEASURE = """
import json, resource, runpy, sys
sys.argv = sys.argv[1:]
sys.path.insert(0, {root!r})
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    import torch
    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    print("PEAK " + json.dumps({{"rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "gpu_gib":
    gpu}}))
"""


@dataclass
class Args:
    script: str = "ppo_pp"
    """the algorithm script"""
    lora_r: int = 8
    """the LoRA rank of the second variant"""
    iterations: int = 1
    """training iterations of each run"""


def main(args, extra):
    print(f"{args.script}.py, {args.iterations} iteration(s), flags: {' '.join(extra) or '(defaults)'}")
    print(f"{'variant':<20} {'peak RSS (GiB)':>15} {'peak GPU (GiB)':>15}")
    for name, flags in (("full fine-tuning", []), (f"LoRA r {args.lora_r}", ["--lora-r", str(args.lora_r)])):
        with tempfile.TemporaryDirectory() as out:
            argv = [
                f"{args.script}.py",
                "--num-iterations",
                str(args.iterations),
                "--eval-every",
                "0",
                "--save-every",
                "0",
                "--output-dir",
                out,
                *extra,
                *flags,
            ]
            done = subprocess.run(
                [sys.executable, "-c", MEASURE.format(root=ROOT), *argv], cwd=ROOT, capture_output=True, text=True
            )
        peaks = [line for line in done.stdout.splitlines() if line.startswith("PEAK ")]
        if done.returncode != 0 or not peaks:
            sys.exit(f"{name}: the run failed:\n{done.stderr[-2000:]}")
        peak = json.loads(peaks[-1][5:])
        gpu = f"{peak['gpu_gib']:.2f}" if peak["gpu_gib"] is not None else "-"
        print(f"{name:<20} {peak['rss_gib']:>15.2f} {gpu:>15}", flush=True)


if __name__ == "__main__":
    split = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    main(tyro.cli(Args, args=sys.argv[1:split]), sys.argv[split + 1 :])
