"""The paper's Table 1 in miniature: SFT, then PPO, PPO++, AggreVaTeD, LOLS and D2LOLS from the SFT checkpoint with
the SFT model (nucleus sampling) as the guide, several seeds, identical budgets; a table and a reward curve.

    python benchmark/study.py                                   # offline default task, 3 seeds
    python benchmark/study.py --parallel 15 --num-iterations 30 # on a GPU, all runs at once
    python benchmark/study.py ... -- --model-name DIR           # flags after -- go to sft.py and every RL run
    python benchmark/study.py --eval-split test ...             # the final report: evaluate on the test split

Writes {output}/table.md, {output}/results.json and {output}/reward_curve.png (reward against episodes and against
eval/kl; needs matplotlib, optional). Runs already in {output}/runs are reused, and the table says which."""

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import tasks  # noqa: E402

ALGORITHMS = ["ppo", "ppo_pp", "aggrevated", "lols", "d2lols", "grpo", "grpo_pp"]
METRICS = [("eval/reward", "reward"), ("eval/perplexity", "perplexity"), ("eval/output_perplexity", "output ppl")]


@dataclass
class Args:
    task: tasks.Name = "rotten-tomatoes"
    """the task (its preset in tasks/ supplies everything not set here)"""
    output: str = "results/rotten-tomatoes"
    """where the table, results.json, the plot and the runs go"""
    algorithms: tuple[str, ...] = ("ppo", "ppo_pp", "aggrevated", "lols", "d2lols")
    """the scripts to compare (any of ppo, ppo_pp, aggrevated, lols, d2lols, grpo, grpo_pp)"""
    seeds: int = 3
    """seeds per algorithm (1..seeds)"""
    num_iterations: int = 30
    """RL iterations of every run"""
    rollouts_per_iteration: Optional[int] = None
    """episodes per iteration of every run (None: the task's preset, a multiple of its minibatch)"""
    eval_every: int = 5
    """evaluation interval (iterations)"""
    eval_size: int = 200
    """prompts per evaluation"""
    eval_split: Literal["validation", "test"] = "validation"
    """the split sft.py and every run evaluate on: validation while tuning, test for a final report"""
    d2lols_alpha_share: float = 0.2
    """D2LOLS switches after this share of the iterations (the paper: 20 of 100)"""
    sft_epochs: float = 1.0
    """SFT epochs on the positive training reviews"""
    parallel: int = 1
    """runs at once (a GPU fits many small runs)"""
    runs_dir: str = ""
    """where the runs and their checkpoints go (default: {output}/runs; not meant for git)"""


def run(argv, log):
    with open(log, "w") as f:
        subprocess.run([sys.executable, *argv], cwd=ROOT, check=True, stdout=f, stderr=subprocess.STDOUT)


def rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def the_run(parent):
    (name,) = [d for d in os.listdir(parent) if os.path.isdir(os.path.join(parent, d))]
    return os.path.join(parent, name)


def commit():
    """The code that produced the table: the git commit, marked when the tree had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(args, extra):
    start = time.time()
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)
    runs = os.path.abspath(args.runs_dir or os.path.join(out, "runs"))
    rollouts = args.rollouts_per_iteration or tasks.TASKS[args.task]["rollouts_per_iteration"]
    common_flags = ["--task", args.task, "--eval-size", str(args.eval_size), "--eval-split", args.eval_split, *extra]

    # 1. SFT on the positive reviews (its before/after evaluations are the zero-shot and SFT rows)
    sft_parent = os.path.join(runs, "sft")
    reused = [name for name in ["sft", *[f"{a}_{s}" for a in args.algorithms for s in range(1, args.seeds + 1)]]
              if os.path.isdir(os.path.join(runs, name)) and any(os.scandir(os.path.join(runs, name)))]
    if not os.path.isdir(sft_parent):
        os.makedirs(sft_parent)
        run(["sft.py", *common_flags, "--num-epochs", str(args.sft_epochs), "--output-dir", sft_parent], os.path.join(out, "sft.log"))
    sft_rows = [r for r in rows(the_run(sft_parent)) if "eval/reward" in r]
    checkpoint = os.path.join(the_run(sft_parent), "checkpoint")

    # 2. Every algorithm from the SFT checkpoint, the SFT model as guide (the default --guide-name), same budget
    jobs = []
    for algorithm in args.algorithms:
        for seed in range(1, args.seeds + 1):
            parent = os.path.join(runs, f"{algorithm}_{seed}")
            flags = [*common_flags, "--model-name", checkpoint, "--seed", str(seed), "--output-dir", parent,
                     "--num-iterations", str(args.num_iterations), "--rollouts-per-iteration", str(rollouts),
                     "--eval-every", str(args.eval_every), "--save-every", "0"]
            if algorithm == "d2lols":
                flags += ["--alpha", str(round(args.d2lols_alpha_share * args.num_iterations))]
            jobs.append((algorithm, seed, parent, [f"{algorithm}.py", *flags]))

    def launch(job):
        algorithm, seed, parent, argv = job
        if not os.path.isdir(parent) or not any(os.scandir(parent)):
            os.makedirs(parent, exist_ok=True)
            run(argv, os.path.join(parent, "log.txt"))
        print(f"done {algorithm} seed {seed}", flush=True)

    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(launch, jobs))

    # 3. The table: final metrics on --eval-split, mean +- std over seeds; the command as typed (its paths as given, quoted)
    results = {"args": asdict(args), "command": shlex.join(["python", "benchmark/study.py", *sys.argv[1:]]),
               "commit": commit(), "reused_runs": reused, "rollouts_per_iteration": rollouts, "machine": machine(), "wall_time_s": None, "rows": {}, "curves": {}}
    results["rows"]["zero-shot"] = {k: [sft_rows[0][k]] for k, _ in METRICS}
    results["rows"]["SFT"] = {k: [sft_rows[-1][k]] for k, _ in METRICS}
    guided = [a for a in args.algorithms if a not in ("ppo", "grpo")]  # their iteration 0 evaluates the guide too
    guide = [rows(the_run(parent))[0] for algorithm, _, parent, _ in jobs if guided and algorithm == guided[0]]
    if guide:
        results["rows"]["guide (SFT + nucleus)"] = {k: [g[k.replace("eval/", "eval/guide_")] for g in guide] for k, _ in METRICS}
    for algorithm in args.algorithms:
        per_seed = [rows(the_run(parent)) for a, _, parent, _ in jobs if a == algorithm]
        results["rows"][algorithm] = {k: [r[-1][k] for r in per_seed] for k, _ in METRICS}
        results["curves"][algorithm] = [[(r["episodes"], r["eval/reward"], r.get("eval/kl")) for r in run_rows if "eval/reward" in r] for run_rows in per_seed]
    results["wall_time_s"] = round(time.time() - start)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = markdown(results, args)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table)
    print(table)
    plot(results, os.path.join(out, "reward_curve.png"))


def machine():
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
        return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (torch {torch.__version__})"
    except ImportError:
        return platform.platform()


def markdown(results, args):
    lines = [f"{args.eval_split.capitalize()} metrics at the end of training, mean ± std over {args.seeds} seeds "
             f"({args.num_iterations} iterations x {results['rollouts_per_iteration']} episodes, {args.eval_size} prompts).", "",
             "| | " + " | ".join(name for _, name in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for row, values in results["rows"].items():
        cells = []
        for key, _ in METRICS:
            mean, std = mean_std(values[key])
            cells.append(f"{mean:.3f} ± {std:.3f}" if len(values[key]) > 1 else f"{mean:.3f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    total = 1 + len(results["args"]["algorithms"]) * args.seeds
    reused = f" ({len(results['reused_runs'])} of its {total} runs reused from an earlier invocation)" if results["reused_runs"] else ""
    lines += ["", f"Command: `{results['command']}`", f"Commit: {results['commit']}{reused}", f"Machine: {results['machine']}",
              f"Wall time: {results['wall_time_s']} s", ""]
    return "\n".join(lines)


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, (ax, kl_ax) = plt.subplots(1, 2, figsize=(11, 4))  # reward against episodes, and against eval/kl (the paper's Fig. 2)
    for algorithm, runs in results["curves"].items():
        episodes = [point[0] for point in runs[0]]
        per_point = list(zip(*[[point[1] for point in run] for run in runs]))
        means = [statistics.mean(p) for p in per_point]
        stds = [statistics.stdev(p) if len(p) > 1 else 0.0 for p in per_point]
        line, = ax.plot(episodes, means, label=algorithm)
        ax.fill_between(episodes, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.15)
        points = [(point[2], point[1]) for run in runs for point in run if len(point) > 2 and point[2] is not None]
        kl_ax.scatter([k for k, _ in points], [r for _, r in points], s=12, color=line.get_color(), label=algorithm)
    for a in (ax, kl_ax):
        if "guide (SFT + nucleus)" in results["rows"]:
            a.axhline(statistics.mean(results["rows"]["guide (SFT + nucleus)"]["eval/reward"]), color="gray", linestyle="--", label="guide (SFT + nucleus)")
        a.set_ylabel(f"{results['args']['eval_split']} reward")
    ax.set_xlabel("training episodes")
    kl_ax.set_xlabel("eval/kl (nats per response), every evaluation of every seed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    split = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    study_args = tyro.cli(Args, args=sys.argv[1:split])
    unknown = sorted(set(study_args.algorithms) - set(ALGORITHMS))
    if unknown:
        sys.exit(f"error: unknown algorithm(s) {', '.join(unknown)}; choose from: {', '.join(ALGORITHMS)}")
    main(study_args, sys.argv[split + 1 :])
