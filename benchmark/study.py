"""The paper's Table 1 in miniature: SFT, then PPO, PPO++, AggreVaTeD, LOLS and D2LOLS from the SFT checkpoint with
the SFT model (nucleus sampling) as the guide, several seeds, identical budgets; a table and a reward curve.

    python benchmark/study.py                                   # offline default task, 3 seeds
    python benchmark/study.py --task verdicts --start zero-shot # docs/predictions.md: the zero-shot model learns,
                                                                # the SFT checkpoint is its guide
    python benchmark/study.py ... --variants ppo_pp:beta=0.5 d2lols:alpha=1   # ablations, paired with PPO's seeds
    python benchmark/study.py --parallel 15 --num-iterations 30 # on a GPU, all runs at once
    python benchmark/study.py ... -- --model-name DIR           # flags after -- go to sft.py, every RL run and
    final_eval.py
    python benchmark/study.py --eval-split test ...             # the final report: evaluate on the test split

Every row of the table is a final evaluation (benchmark/final_eval.py), the same for all: the first --final-eval-size
prompts of --eval-split (0: all of them) sampled under --final-eval-seed, eval/kl from the SFT checkpoint. A run's
final evaluation follows its training in the same worker (--parallel), then its checkpoint is deleted (model and
optimizer state: 25+ of them would fill a disk) unless --keep-checkpoints; the SFT checkpoint stays. Beside mean +- std
over seeds, each algorithm's difference from PPO paired by seed, with a 95% interval (Student t).

Writes {output}/table.md, {output}/results.json and {output}/reward_curve.png (the runs' evaluations during training:
reward against episodes and against eval/kl; needs matplotlib, optional). Runs and final evaluations already in
{output}/runs are reused, and the table says which runs; runs cut short (a study killed midway) are run again."""

import ctypes
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Literal, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import ppo  # noqa: E402
import tasks  # noqa: E402
from plumbing import UserError, check  # noqa: E402
from plumbing.runs import complete as checkpoint_complete  # noqa: E402
from plumbing.runs import parse  # noqa: E402

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
    """prompts per evaluation during training (the curves; the table's rows: --final-eval-size)"""
    eval_split: Literal["validation", "test"] = "validation"
    """the split sft.py, every run and the final evaluation use: validation while tuning, test for a final report"""
    d2lols_alpha_share: float = 0.2
    """D2LOLS switches after this share of the iterations (the paper: 20 of 100)"""
    sft_epochs: float = 1.0
    """SFT epochs on the positive training reviews"""
    parallel: int = 1
    """runs at once (a GPU fits many small runs)"""
    runs_dir: str = ""
    """where the runs and their checkpoints go (default: {output}/runs; not meant for git)"""
    final_eval_size: int = 0
    """the final evaluation of every row: the first this many prompts of --eval-split (0: the whole split)"""
    final_eval_seed: int = 0
    """the sampling seed of the final evaluation, the same for every row"""
    keep_checkpoints: bool = False
    """keep each RL run's checkpoint after its final evaluation (default: deleted; the SFT checkpoint always stays)"""
    start: Literal["sft", "zero-shot"] = "sft"
    """where every RL run starts: the SFT checkpoint, which is also the guide (the paper's Table 1), or the zero-shot
    model (the task's --model-name) with the SFT checkpoint as its guide and the zero-shot model as pi_0 of eval/kl"""
    variants: tuple[str, ...] = ()
    """ablations: SCRIPT:FLAG=VALUE rows (ppo_pp:beta=0.5, d2lols:alpha=1), each run with the same seeds as the rest
    and paired with PPO's (ppo is in every study with variants)"""


def run(argv, log):
    """A child run, its output to log. The study owns its children: a child ends when the study ends (kill -9
    included: the kernel sends it SIGKILL when its parent dies), so a study run again never races one left behind."""
    with open(log, "w") as f:
        done = subprocess.run(
            [sys.executable, *argv], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        )
    if done.returncode != 0:
        with open(log) as f:
            last = ([line.strip() for line in f if line.strip()] or ["(no output)"])[-1]
        raise UserError(f"{argv[0]} stopped (exit {done.returncode}): {last[:300]} (its log: {log})")


def die_with_parent():
    """In the child, before it starts: Linux's prctl(PR_SET_PDEATHSIG, SIGKILL), so it dies with the study."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def the_run(parent):
    (name,) = [d for d in os.listdir(parent) if os.path.isdir(os.path.join(parent, d))]
    return os.path.join(parent, name)


def finished(parent):
    """A run (or the SFT) that got to its end: its final evaluation is there, or the checkpoint it writes last (whole,
    by a rename). A study killed midway leaves runs with neither; the next invocation runs them again."""
    if not os.path.isdir(parent) or not any(os.scandir(parent)):
        return False
    run_dir = the_run(parent)
    if os.path.basename(parent) == "sft":
        return os.path.isdir(os.path.join(run_dir, "checkpoint"))
    return os.path.isfile(os.path.join(run_dir, "final_eval.json")) or checkpoint_complete(
        os.path.join(run_dir, "checkpoint")
    )


def commit():
    """The code that produced the table: the git commit, marked when the tree had uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def t_quantile(df, p=0.975):
    """The p-quantile of Student's t with df degrees of freedom (p = 0.975: the two-sided 95% critical value; df 1:
    12.706, df 4: 2.776, df 30: 2.042, -> 1.960 as df grows). Bisection on the CDF, 1/2 + the integral of the density
    from 0 to t by Simpson's rule."""
    scale = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    density = lambda x: scale * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731

    def cdf(t, steps=1000):
        h = t / steps
        return 0.5 + h / 3 * sum(
            (1 if i in (0, steps) else 4 if i % 2 else 2) * density(i * h) for i in range(steps + 1)
        )

    low, high = 0.0, 1.0
    while cdf(high) < p:
        low, high = high, 2 * high
    for _ in range(50):
        low, high = ((low + high) / 2, high) if cdf((low + high) / 2) < p else (low, (low + high) / 2)
    return (low + high) / 2


def paired_difference(values, baseline):
    """values[s] - baseline[s] for each seed s, their mean and its 95% interval: mean +- t(n-1) x std / sqrt(n)."""
    diffs = [v - b for v, b in zip(values, baseline)]
    mean, std = mean_std(diffs)
    half = t_quantile(len(diffs) - 1) * std / math.sqrt(len(diffs))
    return {"per_seed": diffs, "mean": mean, "low": mean - half, "high": mean + half}


def main(args, extra):
    start = time.time()
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)
    runs = os.path.abspath(args.runs_dir or os.path.join(out, "runs"))
    preset = tasks.defaults(ppo.Args, args.task)
    rollouts = args.rollouts_per_iteration or preset.rollouts_per_iteration
    # the rows: every algorithm, then every variant (name, script, its own flags)
    row_specs = [(a, a, []) for a in args.algorithms] + [variant(v) for v in args.variants]
    common_flags = ["--task", args.task, "--eval-size", str(args.eval_size), "--eval-split", args.eval_split, *extra]

    # 1. SFT on the positive reviews
    sft_parent = os.path.join(runs, "sft")
    reused = [
        name
        for name in ["sft", *[f"{slug(r)}_{s}" for r, _, _ in row_specs for s in range(1, args.seeds + 1)]]
        if finished(os.path.join(runs, name))
    ]
    if not finished(sft_parent):
        shutil.rmtree(sft_parent, ignore_errors=True)  # nothing, or an SFT cut short: from the start
        os.makedirs(sft_parent)
        run(
            ["sft.py", *common_flags, "--num-epochs", str(args.sft_epochs), "--output-dir", sft_parent],
            os.path.join(out, "sft.log"),
        )
    sft_run = the_run(sft_parent)
    checkpoint = os.path.join(sft_run, "checkpoint")

    # 2. Every algorithm from the SFT checkpoint, the SFT model as guide (the default --guide-name), same budget; or
    # (--start zero-shot) from the zero-shot model with the SFT checkpoint as the guide
    zero_shot = extra[extra.index("--model-name") + 1] if "--model-name" in extra else preset.model_name
    start_flags = ["--model-name", checkpoint] if args.start == "sft" else []
    jobs = []
    for row, algorithm, own_flags in row_specs:
        guide = ["--guide-name", checkpoint] if args.start == "zero-shot" and algorithm not in ("ppo", "grpo") else []
        for seed in range(1, args.seeds + 1):
            parent = os.path.join(runs, f"{slug(row)}_{seed}")
            flags = [
                *common_flags,
                *start_flags,
                *guide,
                "--seed",
                str(seed),
                "--output-dir",
                parent,
                "--num-iterations",
                str(args.num_iterations),
                "--rollouts-per-iteration",
                str(rollouts),
                "--eval-every",
                str(args.eval_every),
                "--save-every",
                "0",
            ]
            if algorithm == "d2lols" and "--alpha" not in own_flags:
                flags += ["--alpha", str(round(args.d2lols_alpha_share * args.num_iterations))]
            jobs.append((row, seed, parent, [f"{algorithm}.py", *flags, *own_flags]))

    # 3. The final evaluation of every row, the same for all: the same prompts, the same sampling seed, eval/kl from the
    # SFT checkpoint (pi_0 of every run). A flag passed after -- (--model-name ...) sets the zero-shot model, the one
    # SFT started from.
    final_flags = [
        "--task",
        args.task,
        "--eval-split",
        args.eval_split,
        *extra,
        "--final-eval-size",
        str(args.final_eval_size),
        "--seed",
        str(args.final_eval_seed),
        "--reference",
        checkpoint if args.start == "sft" else zero_shot,
    ]
    settings = {"split": args.eval_split, "final_eval_size": args.final_eval_size, "seed": args.final_eval_seed}

    def done(path):
        return os.path.isfile(path) and all(json.load(open(path)).get(k) == v for k, v in settings.items())

    def final_eval(path, model_flags):
        """benchmark/final_eval.py in its own process, writing path; one done earlier with these settings is reused."""
        if not done(path):
            run(["benchmark/final_eval.py", *final_flags, *model_flags, "--out", path], path[: -len(".json")] + ".log")
        return json.load(open(path))

    guided = [row for row, a, _ in row_specs if a not in ("ppo", "grpo")]  # they use the guide (and evaluate it at
    # iteration 0)
    baselines = {"zero-shot": ("zero-shot", []), "SFT": ("sft", ["--model-name", checkpoint])}
    if guided:
        baselines["guide (SFT + nucleus)"] = ("guide", ["--model-name", checkpoint, "--guide"])

    def launch(job):
        """Train (unless a run is there), evaluate, then delete the run's checkpoint (model and optimizer state)."""
        algorithm, seed, parent, argv = job
        if not finished(parent):
            shutil.rmtree(parent, ignore_errors=True)  # nothing, or a run cut short (a study killed): from the start
            os.makedirs(parent)
            run(argv, os.path.join(parent, "log.txt"))
        run_dir = the_run(parent)
        run_checkpoint, path = os.path.join(run_dir, "checkpoint"), os.path.join(run_dir, "final_eval.json")
        check(
            done(path) or os.path.isdir(run_checkpoint),
            f"{run_dir} has no checkpoint to evaluate (deleted after a final evaluation with other settings): delete "
            f"{parent} to run it again",
        )
        result = final_eval(path, ["--model-name", run_checkpoint])
        if not args.keep_checkpoints:
            shutil.rmtree(run_checkpoint, ignore_errors=True)
        print(f"done {algorithm} seed {seed}", flush=True)
        return result

    with ThreadPoolExecutor(args.parallel) as pool:  # the SFT rows' evaluations beside the runs
        baseline_results = {
            row: pool.submit(final_eval, os.path.join(sft_run, f"final_eval_{name}.json"), flags)
            for row, (name, flags) in baselines.items()
        }
        finals = list(pool.map(launch, jobs))
    baseline_results = {row: future.result() for row, future in baseline_results.items()}

    # 4. The table: the final evaluations, mean +- std over seeds, and the differences from PPO paired by seed; the
    # curves: the runs' own evaluations during training. The command as typed (its paths as given, quoted).
    results = {
        "args": asdict(args),
        "command": shlex.join(["python", "benchmark/study.py", *sys.argv[1:]]),
        "commit": commit(),
        "reused_runs": reused,
        "rollouts_per_iteration": rollouts,
        "machine": machine(),
        "wall_time_s": None,
        "final_eval": {k: baseline_results["zero-shot"][k] for k in ("split", "prompts", "prompts_sha256", "seed")},
        "rows": {},
        "differences_from_ppo": {},
        "curves": {},
    }
    for row, result in baseline_results.items():
        results["rows"][row] = {k: [result["metrics"][k]] for k, _ in METRICS}
    for algorithm, _, _ in row_specs:
        results["rows"][algorithm] = {
            k: [f["metrics"][k] for (a, *_), f in zip(jobs, finals) if a == algorithm] for k, _ in METRICS
        }  # seeds 1, 2, ...
        per_seed = [rows(the_run(parent)) for a, _, parent, _ in jobs if a == algorithm]
        results["curves"][algorithm] = [
            [(r["episodes"], r["eval/reward"], r.get("eval/kl")) for r in run_rows if "eval/reward" in r]
            for run_rows in per_seed
        ]
    if "ppo" in args.algorithms and args.seeds >= 2:
        results["differences_from_ppo"] = {
            a: {k: paired_difference(results["rows"][a][k], results["rows"]["ppo"][k]) for k, _ in METRICS}
            for a, _, _ in row_specs
            if a != "ppo"
        }
    # the plot's guide line: the guide's evaluations at iteration 0 of the first guided algorithm's runs (the curves'
    # prompts)
    results["guide_reward_during_training"] = [
        rows(the_run(parent))[0]["eval/guide_reward"] for a, _, parent, _ in jobs if guided and a == guided[0]
    ]
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
    final = results["final_eval"]
    lines = [
        f"Final evaluation of every row on {final['prompts']} prompts of the {final['split']} split, "
        f"sampling seed {final['seed']}, the same for every row; every run starts from "
        + (
            "the SFT checkpoint, its guide"
            if args.start == "sft"
            else "the zero-shot model, the SFT checkpoint its guide"
        )
        + f"; mean ± std over {args.seeds} seeds "
        f"({args.num_iterations} iterations x {results['rollouts_per_iteration']} episodes). "
        "The curves (reward_curve.png) are the runs' evaluations during "
        f"training ({args.eval_size} prompts, each run's own seed).",
        "",
        "| | " + " | ".join(name for _, name in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for row, values in results["rows"].items():
        cells = []
        for key, _ in METRICS:
            mean, std = mean_std(values[key])
            cells.append(f"{mean:.3f} ± {std:.3f}" if len(values[key]) > 1 else f"{mean:.3f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    if results["differences_from_ppo"]:
        lines += [
            "",
            f"Difference from ppo, paired by seed: the mean over the {args.seeds} seeds of (algorithm - ppo) "
            "and its 95% "
            f"interval (Student t, df = {args.seeds - 1}).",
            "",
            "| | " + " | ".join(name for _, name in METRICS) + " |",
            "|---|" + "---|" * len(METRICS),
        ]
        for algorithm, diffs in results["differences_from_ppo"].items():
            cells = [
                f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" for d in (diffs[key] for key, _ in METRICS)
            ]
            lines.append(f"| {algorithm} | " + " | ".join(cells) + " |")
    total = 1 + (len(results["args"]["algorithms"]) + len(results["args"]["variants"])) * args.seeds
    reused = (
        f" ({len(results['reused_runs'])} of its {total} runs reused from an earlier invocation)"
        if results["reused_runs"]
        else ""
    )
    lines += [
        "",
        f"Command: `{results['command']}`",
        f"Commit: {results['commit']}{reused}",
        f"Machine: {results['machine']}",
        f"Wall time: {results['wall_time_s']} s"
        + (" (this invocation's only: not the reused runs')" if reused else ""),
        "",
    ]
    return "\n".join(lines)


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, (ax, kl_ax) = plt.subplots(
        1, 2, figsize=(11, 4)
    )  # reward against episodes, and against eval/kl (the paper's Fig. 2)
    for algorithm, runs in results["curves"].items():
        episodes = [point[0] for point in runs[0]]
        per_point = list(zip(*[[point[1] for point in run] for run in runs]))
        means = [statistics.mean(p) for p in per_point]
        stds = [statistics.stdev(p) if len(p) > 1 else 0.0 for p in per_point]
        (line,) = ax.plot(episodes, means, label=algorithm)
        ax.fill_between(
            episodes, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.15
        )
        points = [(point[2], point[1]) for run in runs for point in run if len(point) > 2 and point[2] is not None]
        kl_ax.scatter([k for k, _ in points], [r for _, r in points], s=12, color=line.get_color(), label=algorithm)
    for a in (ax, kl_ax):
        if results["guide_reward_during_training"]:
            a.axhline(
                statistics.mean(results["guide_reward_during_training"]),
                color="gray",
                linestyle="--",
                label="guide (SFT + nucleus)",
            )
        a.set_ylabel(f"{results['args']['eval_split']} reward")
    ax.set_xlabel("training episodes")
    kl_ax.set_xlabel("eval/kl (nats per response), every evaluation of every seed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def variant(spec):
    """'ppo_pp:beta=0.5' -> ('ppo_pp beta=0.5', 'ppo_pp', ['--beta', '0.5'])."""
    script, _, setting = spec.partition(":")
    flag, _, value = setting.partition("=")
    check(
        script in ALGORITHMS and flag and value,
        f"--variants {spec}: expected SCRIPT:FLAG=VALUE with SCRIPT one of {', '.join(ALGORITHMS)}",
    )
    return f"{script} {flag}={value}", script, [f"--{flag.replace('_', '-')}", value]


def slug(row):
    """A row's name as a directory name: 'ppo_pp beta=0.5' -> 'ppo_pp-beta-0.5'."""
    return row.replace(" ", "-").replace("=", "-")


def check_args(args):
    unknown = sorted(set(args.algorithms) - set(ALGORITHMS))
    check(not unknown, f"unknown algorithm(s) {', '.join(unknown)}; choose from: {', '.join(ALGORITHMS)}")
    for spec in args.variants:
        variant(spec)
    check(not args.variants or "ppo" in args.algorithms, "--variants are paired with ppo: keep ppo in --algorithms")
    check(args.seeds >= 1 and args.final_eval_size >= 0, "--seeds must be >= 1, --final-eval-size >= 0 (0: all)")
    check(args.parallel >= 1 and args.num_iterations >= 1, "--parallel and --num-iterations must be >= 1")


if __name__ == "__main__":
    split = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    try:
        study_args = parse(Args, sys.argv[1:split])
        check_args(study_args)
        main(study_args, sys.argv[split + 1 :])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
