"""Where an iteration's time goes, per phase, for each script, at two shapes; printed as a table.

    python benchmark/profile_phases.py                                   # both shapes, the five scripts, 2 iterations
    each
    python benchmark/profile_phases.py --shapes smollm2 -- --rollouts-per-iteration 8 --minibatch-size 4   # small, on a
    CPU
    python benchmark/profile_phases.py -- --fast-decoding                # flags after -- go to every run

Shapes:
  gpt2-imdb  GPT-2 small (124M) with random weights at the IMDB preset's shape (prompts cut to 64 tokens, 48 new tokens,
             28 episodes per iteration in minibatches of 7, 5 epochs), a random DistilBERT-base reward; the texts are
             Rotten Tomatoes snippets joined per film (long enough for 64-token prompts), SmolLM2's tokenizer (no GPT-2
             tokenizer ships offline). Random weights: the time of an iteration does not depend on what the model knows.
  smollm2    the offline default task as it is (SmolLM2-135M, rotten-tomatoes).

Phases of the median iteration of 2..N (`--iterations N`; the first is warm-up; one iteration's phases add up):
rollin decode, rollout decode (PPO's whole generation is a rollout), reward, the old/reference forward passes, the
update (the rest of the iteration: losses, backward, optimizer), and the evaluation after the last one. Decoding
tokens per second count every token the samplers returned. Peak memory: CUDA's max allocated, or the process's peak
RSS on a CPU. Each run is its own process; times are synchronized on CUDA."""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PHASES = ("rollin", "rollout", "reward", "old_ref_forward", "update", "evaluation")


@dataclass
class Args:
    scripts: List[str] = field(default_factory=lambda: ["ppo", "ppo_pp", "aggrevated", "lols", "d2lols"])
    """the scripts to profile; the first is the baseline of the ratio column"""
    shapes: List[str] = field(default_factory=lambda: ["gpt2-imdb", "smollm2"])
    """gpt2-imdb and/or smollm2"""
    iterations: int = 2
    """training iterations per run: the first is warm-up, the figures are those of the median of the others (more on
    a GPU, where a new batch or cache size can still compile in the second)"""
    eval_size: int = 32
    """prompts of the evaluation timed after the last iteration"""
    json_out: str = ""
    """also write the figures here (JSON)"""


# ---------------------------------------------------------------------------------------------------------------
# The child: one script's run with the shared helpers wrapped by timers.
# ---------------------------------------------------------------------------------------------------------------
def child(script, argv):
    import torch

    import common
    import tasks
    from plumbing import runs

    cuda = torch.cuda.is_available()
    clock = {p: 0.0 for p in PHASES} | {"tokens": 0, "decode": 0.0, "in_eval": False}
    rows = []

    def now():
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def timed(phase, fn):
        def run(*args, **kwargs):
            start = now()
            out = fn(*args, **kwargs)
            clock[phase] += now() - start
            return out

        return run

    generate = common.generate_with_restarts

    def generate_timed(samplers, query, query_mask, rollin_by, *args, **kwargs):
        rollins = sum(
            bool((rollin_by == who).any()) for who in (common.POLICY, common.GUIDE)
        )  # its first calls are the rollins
        calls = [0]

        def wrap(fn):
            def decode(*a):
                phase = "rollin" if calls[0] < rollins else "rollout"
                calls[0] += 1
                start = now()
                tokens, lengths = fn(*a)
                seconds = now() - start
                clock[phase] += seconds
                clock["decode"] += seconds
                clock["tokens"] += int(lengths.sum())
                return tokens, lengths

            return decode

        if clock["in_eval"]:
            return generate(samplers, query, query_mask, rollin_by, *args, **kwargs)
        return generate({k: wrap(v) for k, v in samplers.items()}, query, query_mask, rollin_by, *args, **kwargs)

    forward = common.forward

    def forward_timed(*args, **kwargs):
        if torch.is_grad_enabled() or clock["in_eval"]:
            return forward(*args, **kwargs)
        return timed("old_ref_forward", forward)(*args, **kwargs)

    evaluate = common.evaluate

    def evaluate_timed(*args, **kwargs):
        clock["in_eval"] = True
        try:
            return timed("evaluation", evaluate)(*args, **kwargs)
        finally:
            clock["in_eval"] = False

    load_reward = tasks.load_reward

    class TimedReward:
        def __init__(self, fn):
            self.fn = fn

        def __call__(self, prompts, generations):
            return self.fn(prompts, generations) if clock["in_eval"] else timed("reward", self.fn)(prompts, generations)

        def __getattr__(self, name):
            return getattr(self.fn, name)

    log = runs.Logger.log

    def log_timed(self, row, *args, **kwargs):
        if "time/iteration_s" in row:
            spent = sum(clock[p] for p in ("rollin", "rollout", "reward", "old_ref_forward"))
            rows.append(
                {
                    **{p: clock[p] for p in PHASES},
                    "update": row["time/iteration_s"] - spent,
                    "iteration": row["time/iteration_s"],
                    "decode_tokens_per_s": clock["tokens"] / max(clock["decode"], 1e-9),
                }
            )
        for key in clock:
            clock[key] = False if key == "in_eval" else 0
        return log(self, row, *args, **kwargs)

    common.generate_with_restarts, common.forward, common.evaluate = generate_timed, forward_timed, evaluate_timed
    tasks.load_reward = lambda *a, **k: TimedReward(load_reward(*a, **k))
    runs.Logger.log = log_timed
    sys.argv = [f"{script}.py", *argv]
    module = __import__(script)
    runs.cli(module.main, module.Args)
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    in_order = sorted(rows[1:], key=lambda r: r["iteration"])
    summary = in_order[(len(in_order) - 1) // 2] | {
        "evaluation": rows[-1]["evaluation"]
    }  # the median iteration: its phases add up
    print("PROFILE " + json.dumps({**summary, "peak_memory_gib": peak, "timed_iterations": len(rows) - 1}))


# ---------------------------------------------------------------------------------------------------------------
# The parent: the assets of the gpt2-imdb shape, one child per (shape, script), the table.
# ---------------------------------------------------------------------------------------------------------------
def gpt2_imdb_assets():
    """Random GPT-2 small and DistilBERT-base with SmolLM2's tokenizer, and an IMDB-format dataset of Rotten Tomatoes
    snippets joined per film; built once into the cache."""
    import torch
    import transformers

    from plumbing import models
    from tasks import sentiment

    root = os.path.join(models.CACHE_DIR, "profile")
    paths = {k: os.path.join(root, k) for k in ("gpt2-small-random", "distilbert-random", "imdb-format")}
    if all(os.path.isdir(p) for p in paths.values()):
        return paths
    tokenizer = models.load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    models.save_checkpoint_model(gpt2, tokenizer, paths["gpt2-small-random"])
    bert = transformers.DistilBertForSequenceClassification(
        transformers.DistilBertConfig(
            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, id2label={0: "NEGATIVE", 1: "POSITIVE"}
        )
    )
    bert.save_pretrained(paths["distilbert-random"])
    tokenizer.save_pretrained(paths["distilbert-random"])
    films = {}
    for row in sentiment.rotten_tomatoes_rows():
        films.setdefault((row["movie_name"], row["category"]), []).append(row["text"])
    texts = [
        (" ".join(t), category == "fresh") for (_, category), t in films.items() if len(" ".join(t).split()) >= 200
    ]
    os.makedirs(paths["imdb-format"], exist_ok=True)
    for split, part in (("train", texts[: len(texts) // 2]), ("test", texts[len(texts) // 2 :])):
        with open(os.path.join(paths["imdb-format"], f"{split}.jsonl"), "w") as f:
            for text, label in part:
                f.write(json.dumps({"text": text, "label": int(label)}) + "\n")
    return paths


def shape_flags(shape, script, args):
    flags = [
        "--num-iterations",
        str(args.iterations),
        "--eval-every",
        str(args.iterations),
        "--save-every",
        "0",
        "--eval-size",
        str(args.eval_size),
    ]
    if shape == "gpt2-imdb":
        p = gpt2_imdb_assets()
        flags += [
            "--task",
            "imdb",
            "--dataset-name",
            p["imdb-format"],
            "--model-name",
            p["gpt2-small-random"],
            "--reward-model-name",
            p["distilbert-random"],
            "--eval-lm-name",
            p["gpt2-small-random"],
        ]
    if script == "d2lols":
        flags += ["--alpha", "1"]  # an AggreVaTeD iteration, then PPO++ ones: the timed iterations are PPO++'s
    return flags


def main(args, extra):
    results = {}
    for shape in args.shapes:
        for script in args.scripts:
            with tempfile.TemporaryDirectory() as tmp:
                argv = [*shape_flags(shape, script, args), "--output-dir", tmp, *extra]
                done = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "--child", script, *argv],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                )
            lines = [line for line in done.stdout.splitlines() if line.startswith("PROFILE ")]
            if done.returncode or not lines:
                sys.exit(f"{script} at {shape} failed:\n{done.stderr[-3000:]}")
            results[(shape, script)] = json.loads(lines[-1][len("PROFILE ") :])
    for shape in args.shapes:
        base = results[(shape, args.scripts[0])]["iteration"]
        timed = results[(shape, args.scripts[0])]["timed_iterations"]
        print(
            f"\n{shape}: seconds by phase of the median of {timed} iterations after the first"
            + (f" (flags: {' '.join(extra)})" if extra else "")
        )
        print(
            f"{'script':<11}"
            + "".join(f"{p:>16}" for p in PHASES)
            + f"{'iteration':>11}{'ratio':>7}{'decode tok/s':>14}{'peak GiB':>10}"
        )
        for script in args.scripts:
            r = results[(shape, script)]
            print(
                f"{script:<11}"
                + "".join(f"{r[p]:>16.3f}" for p in PHASES)
                + f"{r['iteration']:>11.3f}{r['iteration'] / base:>6.2f}x"
                + f"{r['decode_tokens_per_s']:>14.0f}{r['peak_memory_gib']:>10.2f}"
            )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({f"{shape}/{script}": r for (shape, script), r in results.items()}, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3:])
    else:
        import tyro

        split = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)  # flags after -- go to every run
        profile_args = tyro.cli(Args, args=sys.argv[1:split])
        if profile_args.iterations < 2:
            sys.exit("error: --iterations must be >= 2 (the first is warm-up, not timed)")
        main(profile_args, sys.argv[split + 1 :])
