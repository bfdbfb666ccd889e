"""The summarization task (paper Sec. 6, App. C.2, Table 6): tldr, Reddit TL;DR. Its preset, its data (prompt = a post
ending in "TL;DR:", reference = the human summary), its preference pairs for reward_model.py, and its metrics beyond
the reward (a learned reward model's raw score): ROUGE-1/2/L (rouge-score, stemming on) and a win rate against the
references judged by an LLM.

No package registry ships TL;DR or its comparisons: the hub names stay the defaults, and the code path is tested on tiny
local files in the same format (a directory of train/valid/test files with prompt, label; with prompt, chosen,
rejected)."""

import os
import random
import re

import torch

from plumbing import UserError, check, guides, models

# What this task changes of the scripts' defaults (tasks/__init__.py). Table 6: 70,400 steps (tokens) per update are
# 1408 episodes of 50 tokens, in minibatches of 128, 4 epochs; 100 iterations make its 7,040,000.
PRESETS = {
    "tldr": dict(
        dataset_name="CarperAI/openai_summarize_tldr",
        model_name="CarperAI/openai_summarize_tldr_sft",  # GPT-J 6B after SFT: policy, guide and KL reference
        reward_model_name=None,  # no hub checkpoint in our format: train one with reward_model.py --task tldr
        eval_lm_name="CarperAI/openai_summarize_tldr_sft",  # the same frozen copy measures output perplexity
        prompt_len=500,
        truncation_side="right",
        max_new_tokens=50,
        min_new_tokens=0,
        top_k=0,
        num_iterations=100,
        rollouts_per_iteration=1408,
        minibatch_size=128,
        ppo_epochs=4,
        learning_rate=1e-5,
        gamma=1.0,
        vf_coef=0.2,
        kl_coef=0.002,
        lora_r=8,
        lora_alpha=64.0,  # Table 6 has dropout 0.1: here 0, so old and new log-probs agree
        eval_every=10,
        eval_size=500,
        save_every=10,
        # The guide's share of rollins: PPO++ 0.6; AggreVaTeD 0.0 (Table 6 prints 1.0: all pi_theta rollins).
        beta=0.6,
        beta_ppo_pp=0.6,
        beta_aggrevated=0.0,
        aggrevated=dict(beta=0.0),
        d2lols=dict(
            alpha=10
        ),  # LOLS and D2LOLS were not run on TL;DR in the paper: 10% of the run, as IMDB's 20 of 100
        # reward_model.py (App. C.2, Table 6): the SFT model's trunk with LoRA r 32, alpha 32, one epoch on the
        # comparisons
        reward_model=dict(
            dataset_name="CarperAI/openai_summarize_comparisons",
            lora_r=32,
            lora_alpha=32.0,
            learning_rate=1e-5,
            batch_size=8,
            max_length=560,
            eval_size=2000,
        ),
    ),
}


def load_tldr(dataset_name, tokenizer):
    """CarperAI/openai_summarize_tldr (train / valid / test of prompt, label) or a local directory in its format.
    Reference = " " + the label + EOS (the prompt ends with "TL;DR:"). Returns (pairs by split, references by
    prompt)."""
    import datasets

    ds = datasets.load_dataset(dataset_name)
    validation = "validation" if "validation" in ds else "valid"
    check(
        "train" in ds and validation in ds, f"dataset {dataset_name} needs 'train' and 'valid' splits (prompt, label)"
    )
    data, references = {}, {}
    for split, name in (("train", "train"), ("validation", validation), ("test", "test")):
        rows = (
            [(prompt, label.strip()) for prompt, label in zip(ds[name]["prompt"], ds[name]["label"]) if label.strip()]
            if name in ds
            else []
        )
        data[split] = [(prompt, " " + label + tokenizer.eos_token) for prompt, label in rows]
        references.update(rows)
    return data, {"references": references}


def load_comparisons(dataset_name):
    """CarperAI/openai_summarize_comparisons (prompt, chosen, rejected; chosen and rejected start with "TL;DR:") as
    {train, test: [(prompt + "\\n" + chosen, prompt + "\\n" + rejected)]}: the texts the reward model reads, in the
    same shape as the RL prompt + generation (the prompt there ends with "TL;DR:"). Identical pairs are dropped."""
    import datasets

    ds = datasets.load_dataset(dataset_name)
    check(
        "train" in ds and "test" in ds,
        f"dataset {dataset_name} needs 'train' and 'test' splits (prompt, chosen, rejected)",
    )
    return {
        split: [
            (p + "\n" + c, p + "\n" + r)
            for p, c, r in zip(ds[split]["prompt"], ds[split]["chosen"], ds[split]["rejected"])
            if c != r
        ]
        for split in ("train", "test")
    }


def rouge(generations, references):
    """Mean ROUGE-1/2/L F1 (0-1) of each generation against its reference, by Google's rouge-score with stemming."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise UserError("the tldr task's ROUGE needs the rouge-score package: pip install rouge-score") from None
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(reference, generation) for generation, reference in zip(generations, references)]
    return {key: sum(s[key].fmeasure for s in scores) / max(1, len(scores)) for key in ("rouge1", "rouge2", "rougeL")}


# ---------------------------------------------------------------------------------------------------------------
# The judged win rate: an LLM compares the policy's summary with the reference, in a random order per item.
# ---------------------------------------------------------------------------------------------------------------
PLACEHOLDERS = ("{post}", "{summary_a}", "{summary_b}")


def parse_choice(answer):
    """'A', 'B' or None from a judge's answer: the last "Preferred: X" (also Answer/Choice/Winner), else an answer that
    is only the letter (quotes, brackets, a period allowed)."""
    labelled = re.findall(
        r"(?:preferred|answer|choice|winner)\W{0,3}\s*[\"'(\[]?\s*\b([AB])\b", answer, flags=re.IGNORECASE
    )
    if labelled:
        return labelled[-1].upper()
    bare = re.fullmatch(r"\W*\b([AB])\b\W*", answer.strip())
    return bare.group(1) if bare else None


class Judge:
    """Win rate of the generations against the references. `complete(prompts) -> answers` is the judge LLM; the
    template has {post}, {summary_a} and {summary_b}. Exactly half of the items (rounded) show the generation as A,
    which ones is shuffled by `seed`, so a judge that always answers "A" scores 0.5."""

    def __init__(self, complete, template, seed):
        check(all(p in template for p in PLACEHOLDERS), f"the judge's prompt must contain {', '.join(PLACEHOLDERS)}")
        self.complete, self.template, self.seed = complete, template, seed

    def positions(self, n):
        """Whether the generation is shown as A, per item: balanced, in a random order."""
        first = [True] * (n // 2) + [False] * (n - n // 2)
        random.Random(self.seed).shuffle(first)
        return first

    def __call__(self, posts, generations, references):
        first = self.positions(len(posts))
        prompts = [
            self.template.replace("{post}", post)
            .replace("{summary_a}", g if a else r)
            .replace("{summary_b}", r if a else g)
            for post, g, r, a in zip(posts, generations, references, first)
        ]
        with torch.random.fork_rng():  # a sampling judge draws from its own stream, never the training one
            torch.manual_seed(self.seed)
            choices = [parse_choice(answer) for answer in self.complete(prompts)]
        wins = [(c == "A") == a for c, a in zip(choices, first) if c is not None]
        return {
            "win_rate": sum(wins) / max(1, len(wins)),
            "judge_unparsed": sum(c is None for c in choices) / max(1, len(choices)),
        }


JUDGE_MAX_TOKENS = 128  # the judge's answer: a one-sentence comparison, then its choice


def load_judge(name, template_path, device, dtype, seed):
    """--eval-judge: a causal LM (hub name, local directory, smollm2-135m), greedy, through its chat template when it
    has one; or openai:MODEL, a chat model behind the OpenAI-compatible endpoint at $OPENAI_BASE_URL (temperature 0)."""
    check(
        template_path,
        "--eval-judge needs --eval-judge-prompt, a text file with the judge's prompt "
        "({post}, {summary_a}, {summary_b})",
    )
    try:
        with open(template_path) as f:
            template = f.read()
    except OSError as e:
        raise UserError(f"--eval-judge-prompt {template_path}: {e.strerror}") from None
    if name.startswith("openai:"):
        base = os.environ.get("OPENAI_BASE_URL")
        check(
            base, f"--eval-judge {name} needs $OPENAI_BASE_URL, the URL of the server (e.g. http://127.0.0.1:8000/v1)"
        )
        chat = guides.openai_completer(
            name[len("openai:") :], base, 1.0, temperature=0.0, chat=True, where="$OPENAI_BASE_URL", role="judge"
        )
        return Judge(
            lambda prompts: [text for text, _ in chat(prompts, [JUDGE_MAX_TOKENS] * len(prompts))], template, seed
        )
    model = models.frozen(models.load_lm(name, device, dtype))
    tokenizer = models.load_tokenizer(name)
    complete = guides.local_completer(model, tokenizer, top_k=1, top_p=1.0)  # top-k 1: greedy

    def ask(prompts):
        if tokenizer.chat_template:
            prompts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in prompts
            ]
        return [text for text, _ in complete(prompts, [JUDGE_MAX_TOKENS] * len(prompts))]

    return Judge(ask, template, seed)


class SummaryReward:
    """The tldr reward: a learned reward model's raw score of prompt + summary. Its metrics: ROUGE against the reference
    summary and, with a judge, the win rate against it."""

    def __init__(self, reward_model, references, judge=None):
        self.reward_model, self.references, self.judge = reward_model, references, judge

    def __call__(self, prompts, generations):
        return self.reward_model(prompts, generations)

    def metrics(self, prompts, generations):
        references = [self.references[p] for p in prompts]
        out = rouge(generations, references)
        if self.judge is not None:
            posts = [re.sub(r"\s*TL;DR:\s*$", "", p) for p in prompts]
            out.update(self.judge(posts, [g.strip() for g in generations], references))
        return out
