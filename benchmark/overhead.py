"""Time per iteration of the RLGF scripts over ppo.py's, at the same batch, on the same machine, in one run.

    python benchmark/overhead.py                      # offline default task, 6 iterations each
    python benchmark/overhead.py --repeats 2 -- --rollouts-per-iteration 64 --minibatch-size 16

Each script runs as its own process with identical flags; the figures are medians of `time/iteration_s` and
`time/generate_s` from metrics.jsonl (evaluation excluded), the first iteration dropped as warm-up. With --repeats
the scripts run in turn (A B C A B C ...) so that a drift of the machine's speed hits all of them alike."""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import List

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    scripts: List[str] = field(default_factory=lambda: ["ppo", "ppo_pp", "aggrevated", "lols", "d2lols"])
    """the scripts to time; the first one is the baseline of the ratios"""
    iterations: int = 6
    """training iterations per run (the first is dropped)"""
    repeats: int = 1
    """runs of each script, interleaved"""


def run_once(script, args, extra, output_dir):
    argv = [
        sys.executable,
        os.path.join(ROOT, f"{script}.py"),
        "--num-iterations",
        str(args.iterations),
        "--eval-every",
        "0",
        "--eval-size",
        "8",
        "--output-dir",
        output_dir,
        "--exp-name",
        script,
        *extra,
    ]
    subprocess.run(argv, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (run_dir,) = [d for d in os.listdir(output_dir) if f"__{script}__" in d]
    rows = [json.loads(line) for line in open(os.path.join(output_dir, run_dir, "metrics.jsonl"))]
    return [r for r in rows if "time/iteration_s" in r][1:]


def main(args, extra):
    times = {s: {"iteration": [], "generate": []} for s in args.scripts}
    for _ in range(args.repeats):
        for script in args.scripts:
            with tempfile.TemporaryDirectory() as tmp:
                for row in run_once(script, args, extra, tmp):
                    times[script]["iteration"].append(row["time/iteration_s"])
                    times[script]["generate"].append(row["time/generate_s"])
    base = statistics.median(times[args.scripts[0]]["iteration"])
    print(
        f"{'script':<12} {'iteration s':>12} {'generate s':>11} {'ratio':>7}   "
        f"(median of {len(times[args.scripts[0]]['iteration'])} iterations)"
    )
    for script in args.scripts:
        it, gen = statistics.median(times[script]["iteration"]), statistics.median(times[script]["generate"])
        print(f"{script:<12} {it:>12.3f} {gen:>11.3f} {it / base:>6.2f}x")


if __name__ == "__main__":
    split = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)  # flags after -- go to every script
    main(tyro.cli(Args, args=sys.argv[1:split]), sys.argv[split + 1 :])
