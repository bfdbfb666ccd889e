"""grpo.py against TRL's GRPOTrainer on the same work (issue 28): the same model, prompts, group size, batch and
minibatch sizes, response length, sampling, loss and optimizer settings, each side in its own process, interleaved,
and the medians of their training-loop times and peak memory printed side by side with TRL's time over ours.

    python benchmark/peers.py                          # 3 pairs, KL off and KL on, the issue's sizes (about 40 min
                                                       # on 2 CPU cores)
    python benchmark/peers.py --pairs 1 --settings kl-off
    python benchmark/peers.py --pairs 1 --prompts 4 --prompts-per-iteration 4 --group-size 2 --new-tokens 4
    python benchmark/peers.py -- --fast-decoding       # flags after -- go to grpo.py's runs only
    python benchmark/peers.py --ours-dir /tmp/old      # grpo.py of another checkout (e.g. before a change)

TRL is an optional dependency (pip install trl); without it this prints one line and exits with status 2.

The work (the issue's defaults): SmolLM2-135M from the project's loader, fp32, CPU, one torch thread per process;
--prompts 24 rotten-tomatoes training prompts (raw text, no chat template, the last 32 tokens kept), --prompts-per-
iteration 8 per generation round, --group-size 4 completions each, exactly --new-tokens 24 new tokens (top-k 50,
temperature 1), minibatches of --minibatch-size 8 completions, 1 epoch: 3 rounds of 32 completions, 12 optimizer
steps. The prompts are those grpo.py drew: each TRL run gets, in the same order, the prompts of the grpo.py run just
before it. Two settings: kl-off (grpo.py --kl-coef 0 --mle-coef 0, TRL beta 0) and kl-on (grpo.py --kl-coef 0.001
--mle-coef 0, TRL beta 0.001); `python benchmark/peers.py` prints the full table of what is matched and what cannot be.

What is timed. The training loop: grpo.py's iterations, the sum of their time/iteration_s (collect, score,
advantages, update; its evaluations at iteration 0 and at the end, the checkpoint and the model loading are outside;
--eval-size 0 when grpo.py accepts it, else 1); TRL's train() from on_train_begin to on_train_end (the model and the
reference are loaded before; no evaluation, no saving, no logging). The phases: grpo.py's through timers around
common.generate_with_restarts, the reward, and common.forward (without gradients: old log-probs and reference;
with gradients: the loss's forward, or the MLE term's when the tokens are not the rollout's); TRL's from its own
profiling timers (transformers.generate, _calculate_rewards, _get_per_token_logps_and_entropies without gradients:
old log-probs and reference, with: the loss's forward); on both sides the backward passes (torch.autograd.backward)
and the optimizer steps (torch's global optimizer hooks); "other" is the rest of the loop. The phases shown are
those of the run whose loop time is the median. Peak memory: the child process's peak RSS (loading included).

The results are also written as JSON (--out, default results/peers/peers.json under the repository)."""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import List, Literal, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from plumbing import MMAP_THRESHOLD  # noqa: E402  (grpo.py's allocator setting on CPU, for the settings table)

MISSING_TRL = "error: benchmark/peers.py needs TRL: pip install trl"
PHASES = ("generation", "reward", "no_grad_forward", "loss_forward", "mle_forward", "backward", "optimizer")
LABELS = {
    "loop": "training loop",
    "generation": "  generation",
    "reward": "  reward",
    "no_grad_forward": "  no-grad forwards",
    "loss_forward": "  loss forwards",
    "mle_forward": "  MLE forwards",
    "backward": "  backward",
    "optimizer": "  optimizer steps",
    "other": "  other",
}
SETTING_NAMES = {"kl-off": "KL off", "kl-on": "KL on"}


@dataclass
class Args:
    pairs: int = 3
    """(grpo.py, TRL) pairs of runs per setting, interleaved; the medians are reported"""
    settings: List[Literal["kl-off", "kl-on"]] = field(default_factory=lambda: ["kl-off", "kl-on"])
    """kl-off: grpo.py --kl-coef 0, TRL beta 0; kl-on: both --kl-coef (grpo.py's reward penalty, TRL's beta)"""
    prompts: int = 24
    """training prompts per run (each used once, in grpo.py's order)"""
    prompts_per_iteration: int = 8
    """prompts per generation round (grpo.py's iteration)"""
    group_size: int = 4
    """completions per prompt (grpo.py --group-size, TRL num_generations)"""
    minibatch_size: int = 8
    """completions per optimizer step"""
    new_tokens: int = 24
    """exactly this many new tokens per completion (min = max)"""
    prompt_len: int = 32
    """prompt tokens kept (cut from the left)"""
    kl_coef: float = 0.001
    """the KL coefficient of the kl-on setting (grpo.py --kl-coef, TRL beta)"""
    learning_rate: float = 1e-4
    """AdamW learning rate, constant"""
    model_name: str = "smollm2-135m"
    """the policy on both sides, through the project's loader (smollm2-135m or a checkpoint directory)"""
    seed: int = 1
    """seed of both sides"""
    ours_dir: Optional[str] = None
    """the directory holding the grpo.py to measure (default: this repository's)"""
    trl_mmap_threshold: Optional[int] = None
    """give TRL's runs glibc's MALLOC_MMAP_THRESHOLD_ (524288 is grpo.py's own setting on CPU): what the allocator
    setting alone does for TRL (default: glibc's defaults, as TRL runs)"""
    timeout: int = 7200
    """seconds a single run may take"""
    out: Optional[str] = None
    """the JSON results (default: results/peers/peers.json under the repository)"""


# ---------------------------------------------------------------------------------------------------------------
# The children: one run of one side, timed from inside; the last line of stdout is PEERS {json}.
# ---------------------------------------------------------------------------------------------------------------
class Clock:
    """Seconds and calls per phase, counted while `active`: in the training loop (not before it, where the reward
    model may train, nor in grpo.py's evaluations)."""

    def __init__(self):
        self.seconds = {p: 0.0 for p in PHASES}
        self.calls = {p: 0 for p in PHASES}
        self.active = False

    def add(self, phase, seconds):
        if self.active:
            self.seconds[phase] += seconds
            self.calls[phase] += 1


def install_torch_timers(clock):
    """The backward passes and optimizer steps of both sides: torch.autograd.backward (Tensor.backward calls it) and
    torch's global optimizer step hooks."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    backward = torch.autograd.backward

    def backward_timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return backward(*args, **kwargs)
        finally:
            clock.add("backward", time.perf_counter() - start)

    torch.autograd.backward = backward_timed
    started, seen = {}, {}

    def pre(optimizer, args, kwargs):
        flags = {k: optimizer.defaults.get(k) for k in ("fused", "foreach")}
        seen["optimizer"] = f"{type(optimizer).__name__}({', '.join(f'{k}={v}' for k, v in flags.items())})"
        started[id(optimizer)] = time.perf_counter()

    register_optimizer_step_pre_hook(pre)
    register_optimizer_step_post_hook(
        lambda optimizer, args, kwargs: clock.add("optimizer", time.perf_counter() - started.pop(id(optimizer)))
    )
    return seen


def one_thread():
    import torch

    torch.set_num_threads(1)
    return torch


def report(result):
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print("PEERS " + json.dumps(result), flush=True)


def child_ours(spec):
    torch = one_thread()
    sys.path.insert(0, spec["ours_dir"])
    import common
    import grpo
    import tasks
    from plumbing import UserError, runs

    clock, state = (
        Clock(),
        {"responses": set(), "prompts": [], "completions": 0, "tokens": 0, "rows": [], "in_eval": False},
    )
    seen = install_torch_timers(clock)

    def timed(phase, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        clock.add(phase, time.perf_counter() - start)
        return out

    generate = common.generate_with_restarts

    def generate_timed(*args, **kwargs):
        if state["in_eval"]:
            return generate(*args, **kwargs)
        clock.active = True  # the first training iteration's collect: the loop has begun
        rollout = timed("generation", generate, *args, **kwargs)
        state["responses"] = {tuple(r) for r in rollout["response"].tolist()}
        state["tokens"] += int(rollout["response_mask"].sum())
        return rollout

    forward = common.forward

    def forward_timed(model, value_head, query, query_mask, response, response_mask, *args, **kwargs):
        call = (model, value_head, query, query_mask, response, response_mask, *args)
        if not clock.active:
            return forward(*call, **kwargs)
        if not torch.is_grad_enabled():
            return timed("no_grad_forward", forward, *call, **kwargs)
        rollout_tokens = all(tuple(r) in state["responses"] for r in response.tolist())
        return timed("loss_forward" if rollout_tokens else "mle_forward", forward, *call, **kwargs)

    evaluate = common.evaluate

    def evaluate_untimed(*args, **kwargs):
        active, clock.active, state["in_eval"] = clock.active, False, True
        try:
            return evaluate(*args, **kwargs)
        finally:
            clock.active, state["in_eval"] = active, False

    load_reward = tasks.load_reward

    class TimedReward:
        def __init__(self, fn):
            self.fn = fn

        def __call__(self, prompts, generations):
            if not clock.active:
                return self.fn(prompts, generations)
            state["prompts"] += prompts[:: spec["group_size"]]  # a group's prompts are consecutive copies
            state["completions"] += len(generations)
            return timed("reward", self.fn, prompts, generations)

        def __getattr__(self, name):
            return getattr(self.fn, name)

    log = runs.Logger.log

    def log_rows(self, row, *args, **kwargs):
        if "time/iteration_s" in row:
            state["rows"].append({k: row.get(k) for k in ("iteration", "time/iteration_s", "time/generate_s")})
        return log(self, row, *args, **kwargs)

    common.generate_with_restarts, common.forward, common.evaluate = generate_timed, forward_timed, evaluate_untimed
    tasks.load_reward = lambda *a, **k: TimedReward(load_reward(*a, **k))
    runs.Logger.log = log_rows
    eval_size = 0  # no evaluation, where grpo.py takes it; else the smallest one (outside the loop time either way)
    try:
        args = runs.parse(grpo.Args, [*spec["argv"], "--eval-size", "0"], tasks.defaults)
    except UserError:
        eval_size = 1
        args = runs.parse(grpo.Args, [*spec["argv"], "--eval-size", "1"], tasks.defaults)
    grpo.main(args)
    loop = sum(r["time/iteration_s"] for r in state["rows"])
    report(
        {
            "side": "ours",
            "loop_s": loop,
            "phases": {**clock.seconds, "other": loop - sum(clock.seconds.values())},
            "calls": clock.calls,
            "iterations": state["rows"],
            "prompts": state["prompts"],
            "completions": state["completions"],
            "completion_tokens": state["tokens"],
            "optimizer_steps": clock.calls["optimizer"],
            "eval_size": eval_size,
            "optimizer": seen.get("optimizer"),
            "threads": torch.get_num_threads(),
        }
    )


def plain_fp32(model):
    """The project's cache of smollm2-135m is a dequantized GGUF: fp32 weights whose config still names the GGUF
    quantization, which transformers' Trainer refuses to fine-tune ("purely quantized models"). The weights are plain:
    drop the marker."""
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        return True
    return False


def trl_config(spec, output_dir):
    """The GRPOConfig of the matched work. One generation round = steps_per_generation optimizer steps of
    per_device_train_batch_size completions, without gradient accumulation."""
    import trl

    steps_per_round = spec["prompts_per_iteration"] * spec["group_size"] // spec["minibatch_size"]
    rounds = spec["prompts"] // spec["prompts_per_iteration"]
    fields = set(trl.GRPOConfig.__dataclass_fields__)
    kwargs = dict(
        output_dir=output_dir,
        per_device_train_batch_size=spec["minibatch_size"],
        gradient_accumulation_steps=1,
        steps_per_generation=steps_per_round,
        num_generations=spec["group_size"],
        num_iterations=1,  # TRL's PPO epochs
        max_steps=rounds * steps_per_round,
        max_completion_length=spec["new_tokens"],
        generation_kwargs={"min_new_tokens": spec["new_tokens"]},  # no EOS before the budget: fixed length
        temperature=1.0,
        top_k=50,
        top_p=1.0,
        loss_type="dapo",
        scale_rewards="group",
        beta=spec["beta"],
        epsilon=0.2,
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-5,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=False,
        fp16=False,
        use_vllm=False,
        use_cpu=True,
        shuffle_dataset=False,
        seed=spec["seed"],
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
    )
    # gradient checkpointing is on by default in TRL: off, as in grpo.py (its new name first, transformers >= 5.2x)
    kwargs["activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"] = False
    return trl.GRPOConfig(**{k: v for k, v in kwargs.items() if k in fields})


def child_trl(spec):
    torch = one_thread()
    sys.path.insert(0, ROOT)
    import datasets
    import transformers
    import trl
    from trl.extras import profiling

    from plumbing import models
    from tasks import sentiment

    clock, state = Clock(), {"completions": 0, "tokens": 0}
    seen = install_torch_timers(clock)
    trl_phases = {"transformers.generate": "generation", "_calculate_rewards": "reward"}
    log_metrics = profiling.ProfilingContext._log_metrics

    def log_trl_timer(self, duration):  # TRL's own timers (they report only to wandb, mlflow, trackio)
        name = self.name.split(".", 1)[-1]  # "{trainer class}.{name}"
        if name == "_get_per_token_logps_and_entropies":
            clock.add("loss_forward" if torch.is_grad_enabled() else "no_grad_forward", duration)
        elif name in trl_phases:
            clock.add(trl_phases[name], duration)
        return log_metrics(self, duration)

    profiling.ProfilingContext._log_metrics = log_trl_timer
    tokenizer = models.load_tokenizer(spec["model_name"])
    tokenizer.truncation_side = "left"
    model = models.load_lm(spec["model_name"], "cpu")
    unmarked = plain_fp32(model)
    _, labelled = sentiment.load_rotten_tomatoes()
    bag_of_words = sentiment.BagOfWordsSentiment(labelled)

    def rotten_tomatoes_bow(prompts, completions, completion_ids=None, **kwargs):
        """The project's reward: P(positive) of prompt + completion."""
        state["completions"] += len(completions)
        state["tokens"] += sum(len(ids) for ids in completion_ids or [])
        return bag_of_words(prompts, completions).tolist()

    class Trainer(trl.GRPOTrainer):
        def _tokenize_prompts(self, prompts):
            """Raw text prompts, the last prompt_len tokens kept, as grpo.py's common.tokenize_prompts keeps them
            (TRL 1.x has no max_prompt_length)."""
            ids = self.processing_class(text=prompts, truncation=True, max_length=spec["prompt_len"])["input_ids"]
            return ids, None, {}

    class LoopTimer(transformers.TrainerCallback):
        def on_train_begin(self, args, state_, control, **kwargs):
            clock.active, state["begin"] = True, time.perf_counter()

        def on_train_end(self, args, state_, control, **kwargs):
            clock.active, state["loop"] = False, time.perf_counter() - state["begin"]

    with tempfile.TemporaryDirectory() as output_dir:
        trainer = Trainer(
            model=model,
            reward_funcs=rotten_tomatoes_bow,
            args=trl_config(spec, output_dir),
            train_dataset=datasets.Dataset.from_dict({"prompt": spec["prompt_texts"]}),
            processing_class=tokenizer,
            callbacks=[LoopTimer()],
        )
        trainer.train()
    loop = state["loop"]
    report(
        {
            "side": "trl",
            "loop_s": loop,
            "phases": {**clock.seconds, "other": loop - sum(clock.seconds.values())},
            "calls": clock.calls,
            "completions": state["completions"],
            "completion_tokens": state["tokens"],
            "optimizer_steps": clock.calls["optimizer"],
            "quantization_marker_dropped": unmarked,
            "optimizer": seen.get("optimizer"),
            "threads": torch.get_num_threads(),
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        }
    )


# ---------------------------------------------------------------------------------------------------------------
# The parent: the runs, interleaved, and the tables.
# ---------------------------------------------------------------------------------------------------------------
def settings_table(args, eval_size, optimizers):
    """(what, grpo.py, TRL, matched) rows."""
    per_round = args.prompts_per_iteration * args.group_size
    steps_per_round = per_round // args.minibatch_size
    steps = args.prompts // args.prompts_per_iteration * steps_per_round
    yes, no = "yes", "no"
    kl = f"{args.kl_coef:g}"
    trl_allocator = (
        "glibc defaults" if args.trl_mmap_threshold is None else f"MALLOC_MMAP_THRESHOLD_={args.trl_mmap_threshold}"
    )
    old_logprobs = (
        ("a no-grad pass per round", "the same (steps_per_generation > 1)", yes)
        if steps_per_round > 1
        else ("a no-grad pass per round", "none: the loss pass's, detached (1 step/round)", no)
    )
    return [
        ("model", f"{args.model_name}, project loader", "the same (loaded object)", yes),
        ("precision, device", "fp32, CPU, 1 thread", "fp32 (bf16 off), CPU, 1 thread", yes),
        ("prompts", f"{args.prompts} drawn by grpo.py", "the same texts, same order", yes),
        ("prompt tokens", f"raw text, last {args.prompt_len}", f"raw text, last {args.prompt_len}", yes),
        ("per round", f"{args.prompts_per_iteration} prompts x {args.group_size}",
         f"num_generations {args.group_size}, {per_round} per round", yes),
        ("completion length", f"exactly {args.new_tokens} tokens", "max_completion_length = min_new_tokens", yes),
        ("sampling", "top-k 50, temperature 1", "top_k 50, temperature 1", yes),
        ("sampled tokens", "own random stream", "own random stream", no),
        ("optimizer steps", f"{steps} x {args.minibatch_size} completions, 1 epoch",
         f"max_steps {steps}, batch {args.minibatch_size}, num_iterations 1", yes),
        ("minibatches", "random split of the round", "random split of the round", yes + " (other draws)"),
        ("reward", "bag-of-words(prompt + completion)", "the same function", yes),
        ("advantage", "(r - mean) / (std + 1e-4), per group", 'scale_rewards "group"', yes),
        ("policy loss", "clip 0.2, minibatch token mean", 'epsilon 0.2, loss_type "dapo"', yes + " (fixed length)"),
        ("old log-probs", *old_logprobs),
        ("KL off", "--kl-coef 0 --mle-coef 0", "beta 0 (no reference model)", yes),
        ("KL on: work", "reference pass per round", "reference pass per round", yes),
        ("KL on: objective", f"-{kl} x sum(log pi - log pi0) in reward", f"{kl} x per-token k3 term in loss", no),
        ("reference model", "a copy of the policy", "from_pretrained, same directory", yes + " (same weights)"),
        ("MLE term", "--mle-coef 0", "none", yes),
        ("entropy", "as grpo.py computes it", "in the loss pass (fused LM head)", no),
        ("AdamW", f"lr {args.learning_rate:g}, eps 1e-5, wd 0, clip 1", "the same, constant, no warmup", yes),
        ("AdamW kernel", optimizers.get("ours") or "?", optimizers.get("trl") or "?", no),
        ("checkpointing", "none", "activation checkpointing off", yes),
        ("C allocator", f"glibc, mmap threshold {MMAP_THRESHOLD // 1024} KB (device_of)", trl_allocator,
         yes if args.trl_mmap_threshold == MMAP_THRESHOLD else no),
        ("evaluation", f"at 0 and end (--eval-size {eval_size}), untimed", "none", yes),
        ("saving", "one checkpoint at the end, untimed", "none", yes),
        ("loop time", "sum of time/iteration_s", "on_train_begin to on_train_end", yes),
    ]  # fmt: skip


def print_settings(args, eval_size, optimizers):
    rows = [("", "grpo.py", "TRL GRPOTrainer", "matched"), *settings_table(args, eval_size, optimizers)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print("\nWhat each side runs:")
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3])


def median_run(runs):
    """The run with the median loop time (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r["loop_s"])
    return ordered[(len(ordered) - 1) // 2]


def summarize(runs, setting):
    ours = [r for r in runs if r["setting"] == setting and r["side"] == "ours"]
    theirs = [r for r in runs if r["setting"] == setting and r["side"] == "trl"]
    out = {}
    for side, rs in (("ours", ours), ("trl", theirs)):
        mid = median_run(rs)
        out[side] = {
            "loop_s": statistics.median(r["loop_s"] for r in rs),
            "loop_s_each": [r["loop_s"] for r in rs],
            "phases_of_median_run": mid["phases"],
            "peak_rss_gib": statistics.median(r["peak_rss_gib"] for r in rs),
            "peak_rss_gib_each": [r["peak_rss_gib"] for r in rs],
            "completions": mid["completions"],
            "completion_tokens": mid["completion_tokens"],
            "optimizer_steps": mid["optimizer_steps"],
        }
    out["trl_over_ours_loop"] = out["trl"]["loop_s"] / out["ours"]["loop_s"]
    out["trl_over_ours_peak_rss"] = out["trl"]["peak_rss_gib"] / out["ours"]["peak_rss_gib"]
    return out


def print_results(summary, setting, pairs):
    name = SETTING_NAMES[setting]
    ours, theirs = summary["ours"], summary["trl"]
    print(f"\n{name}: medians of {pairs} pair(s); phases of the median run (seconds)")
    print(f"  {'':<22}{'grpo.py':>10}{'TRL':>10}{'TRL/ours':>10}")

    def row(label, a, b, fmt="{:>10.1f}"):
        ratio = f"{b / a:>10.2f}" if a and b else f"{'':>10}"
        cells = [fmt.format(x) if x is not None else f"{'--':>10}" for x in (a, b)]
        print(f"  {label:<22}{cells[0]}{cells[1]}{ratio}")

    row(LABELS["loop"], ours["loop_s"], theirs["loop_s"])
    for phase in (*PHASES, "other"):
        a, b = ours["phases_of_median_run"][phase], theirs["phases_of_median_run"][phase]
        row(LABELS[phase], a if a or phase == "other" else None, b if b or phase == "other" else None)
    row("peak RSS (GiB)", ours["peak_rss_gib"], theirs["peak_rss_gib"], "{:>10.2f}")
    for key, label in (("completions", "completions"), ("completion_tokens", "completion tokens"),
                       ("optimizer_steps", "optimizer steps")):  # fmt: skip
        print(f"  {label:<22}{ours[key]:>10}{theirs[key]:>10}")
    print(f"TRL/ours = {summary['trl_over_ours_loop']:.2f} ({name})")
    print(f"peak memory TRL/ours: {summary['trl_over_ours_peak_rss']:.2f} ({name})")


def run_child(side, spec, timeout, trl_mmap_threshold=None):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "spec.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        }
        if side == "trl" and trl_mmap_threshold is not None:
            env["MALLOC_MMAP_THRESHOLD_"] = str(trl_mmap_threshold)
        try:
            done = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--child", side, path],
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            sys.exit(f"error: the {side} run took longer than --timeout {timeout} s")
    lines = [line for line in done.stdout.splitlines() if line.startswith("PEERS ")]
    if done.returncode or not lines:
        who = "grpo.py" if side == "ours" else "TRL"
        sys.exit(f"error: the {who} run failed (exit status {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("PEERS ") :])


def check_args(args):
    problems = []
    if args.pairs < 1:
        problems.append("--pairs must be >= 1")
    if min(args.prompts, args.prompts_per_iteration, args.minibatch_size, args.new_tokens, args.prompt_len) < 1:
        problems.append("--prompts, --prompts-per-iteration, --minibatch-size, --new-tokens, --prompt-len must be >= 1")
    elif args.prompts % args.prompts_per_iteration:
        problems.append("--prompts must be a multiple of --prompts-per-iteration")
    elif (args.prompts_per_iteration * args.group_size) % args.minibatch_size:
        problems.append("--minibatch-size must divide --prompts-per-iteration x --group-size")
    if args.group_size < 2:
        problems.append("--group-size must be >= 2")
    if not args.kl_coef > 0 or not args.learning_rate > 0:
        problems.append("--kl-coef and --learning-rate must be > 0")
    if not args.settings:
        problems.append("--settings needs kl-off and/or kl-on")
    if args.ours_dir is not None and not os.path.isfile(os.path.join(args.ours_dir, "grpo.py")):
        problems.append(f"--ours-dir {args.ours_dir}: no grpo.py there")
    if problems:
        print(f"error: {'; '.join(problems)}", file=sys.stderr)
        sys.exit(2)


def ours_argv(args, setting, extra):
    return [
        "--task", "rotten-tomatoes",
        "--model-name", args.model_name,
        "--eval-lm-name", args.model_name,
        "--seed", str(args.seed),
        "--device", "cpu",
        "--dtype", "float32",
        "--prompt-len", str(args.prompt_len),
        "--truncation-side", "left",
        "--num-iterations", str(args.prompts // args.prompts_per_iteration),
        "--rollouts-per-iteration", str(args.prompts_per_iteration * args.group_size),
        "--group-size", str(args.group_size),
        "--scale-rewards",
        "--minibatch-size", str(args.minibatch_size),
        "--gradient-accumulation-steps", "1",
        "--ppo-epochs", "1",
        "--max-new-tokens", str(args.new_tokens),
        "--min-new-tokens", str(args.new_tokens),
        "--top-k", "50",
        "--top-p", "1.0",
        "--learning-rate", str(args.learning_rate),
        "--lr-schedule", "constant",
        "--clip-range", "0.2",
        "--max-grad-norm", "1.0",
        "--kl-coef", "0" if setting == "kl-off" else str(args.kl_coef),
        "--mle-coef", "0",
        "--eval-every", "0",
        "--save-every", "0",
        "--output-dir", ".",  # the child's own temporary directory, removed after it (a checkpoint is 1.6 GB)
        *extra,
    ]  # fmt: skip


def require_trl():
    """TRL's version; without TRL, one line and exit status 2."""
    try:
        import trl
    except ModuleNotFoundError as e:
        print(MISSING_TRL if e.name == "trl" else f"error: TRL is installed but does not import: {e}", file=sys.stderr)
        sys.exit(2)
    except ImportError as e:
        print(f"error: TRL is installed but does not import: {e}", file=sys.stderr)
        sys.exit(2)
    return trl.__version__


def child_spec(args, side, setting, ours_dir, extra, prompts):
    spec = {"model_name": args.model_name, "group_size": args.group_size, "seed": args.seed}
    spec["prompt_len"] = args.prompt_len
    if side == "ours":
        return spec | {"ours_dir": ours_dir, "argv": ours_argv(args, setting, extra)}
    return spec | {
        "prompt_texts": prompts,
        "prompts": args.prompts,
        "prompts_per_iteration": args.prompts_per_iteration,
        "minibatch_size": args.minibatch_size,
        "new_tokens": args.new_tokens,
        "learning_rate": args.learning_rate,
        "beta": 0.0 if setting == "kl-off" else args.kl_coef,
    }


def main(args, extra):
    check_args(args)
    trl_version = require_trl()
    ours_dir = os.path.abspath(args.ours_dir or ROOT)
    out = args.out or os.path.join(ROOT, "results", "peers", "peers.json")
    steps = args.prompts * args.group_size // args.minibatch_size
    print(
        f"grpo.py ({ours_dir}) vs TRL {trl_version} GRPOTrainer: {args.prompts} prompts x {args.group_size} "
        f"completions of {args.new_tokens} tokens, {steps} optimizer steps of {args.minibatch_size}; "
        f"{args.pairs} pair(s) per setting, interleaved",
        flush=True,
    )
    runs, loads = [], [os.getloadavg()[0]]
    for pair in range(1, args.pairs + 1):
        for setting in args.settings:
            prompts = None  # grpo.py's, for the TRL run after it
            for side in ("ours", "trl"):
                start = time.time()
                result = run_child(
                    side,
                    child_spec(args, side, setting, ours_dir, extra, prompts),
                    args.timeout,
                    args.trl_mmap_threshold,
                )
                loads.append(os.getloadavg()[0])
                if side == "ours":
                    prompts = result["prompts"]
                    if len(prompts) != args.prompts:
                        sys.exit(f"error: grpo.py's run used {len(prompts)} prompts, not {args.prompts}")
                result |= {"setting": setting, "pair": pair, "wall_s": time.time() - start, "load_1min": loads[-1]}
                runs.append(result)
                who = "grpo.py" if side == "ours" else "TRL"
                print(
                    f"pair {pair}/{args.pairs}  {SETTING_NAMES[setting]:<6}  {who:<7}  loop {result['loop_s']:7.1f} s"
                    f"  peak RSS {result['peak_rss_gib']:5.2f} GiB  (process {result['wall_s']:.0f} s, load average"
                    f" {loads[-1]:.2f})",
                    flush=True,
                )
    ours_runs = [r for r in runs if r["side"] == "ours"]
    first = {s: next(r["prompts"] for r in ours_runs if r["setting"] == s) for s in args.settings}
    same_prompts = all(r["prompts"] == first[r["setting"]] for r in ours_runs)
    versions = next(r["versions"] for r in runs if r["side"] == "trl") | {"python": platform.python_version()}
    optimizers = {side: next(r["optimizer"] for r in runs if r["side"] == side) for side in ("ours", "trl")}
    eval_size = ours_runs[0]["eval_size"]
    print_settings(args, eval_size, optimizers)
    print(
        f"\nVersions: trl {versions['trl']}, transformers {versions['transformers']}, torch {versions['torch']}, "
        f"python {versions['python']}; {os.cpu_count()} CPUs, load average (1 min) {min(loads):.2f} to "
        f"{max(loads):.2f} during the runs"
        + ("" if same_prompts else "; NOTE: grpo.py drew other prompts in some runs (each TRL run took its pair's)")
    )
    summaries = {setting: summarize(runs, setting) for setting in args.settings}
    for setting in args.settings:
        print_results(summaries[setting], setting, args.pairs)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    table = [dict(zip(("what", "grpo.py", "TRL", "matched"), r)) for r in settings_table(args, eval_size, optimizers)]
    with open(out, "w") as f:
        json.dump(
            {
                "args": vars(args) | {"ours_dir": ours_dir, "grpo_flags_after_dashes": extra},
                "settings_table": table,
                "versions": versions,
                "machine": {"cpus": os.cpu_count(), "load_1min_min": min(loads), "load_1min_max": max(loads)},
                "same_prompts_every_run": same_prompts,
                "summary": summaries,
                "runs": runs,
            },
            f,
            indent=1,
        )
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        with open(sys.argv[3]) as f:
            child_spec = json.load(f)
        (child_ours if sys.argv[2] == "ours" else child_trl)(child_spec)
    else:
        import tyro

        split = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)  # flags after -- go to grpo.py's runs
        main(tyro.cli(Args, args=sys.argv[1:split]), sys.argv[split + 1 :])
