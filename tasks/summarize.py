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
# The paper's win-rate prompt (App. C.2, written for Llama2-13B-chat; its typos "<<\\SYS>>" and "hte" kept), with its
# [context], [summary 1], [summary 2] as {post}, {summary_a}, {summary_b}: the tldr preset's --eval-judge-prompt.
PAPER_JUDGE_PROMPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tldr_judge_prompt.txt")

# fmt: off
PRESETS = {
    "tldr": dict(
        dataset_name="CarperAI/openai_summarize_tldr",
        model_name="CarperAI/openai_summarize_tldr_sft",  # GPT-J 6B after SFT: policy, guide and KL reference
        reward_model_name=None,  # no hub checkpoint in our format: train one with reward_model.py --task tldr
        eval_lm_name="CarperAI/openai_summarize_tldr_sft",  # the same frozen copy measures output perplexity
        prompt_len=500, truncation_side="right", max_new_tokens=50, min_new_tokens=0, top_k=0,
        num_iterations=100, rollouts_per_iteration=1408, minibatch_size=128, ppo_epochs=4, learning_rate=1e-5,
        gamma=1.0, vf_coef=0.2, kl_coef=0.002,
        lora_r=8, lora_alpha=64.0,  # Table 6 has dropout 0.1: here 0, so old and new log-probs agree
        critic="separate",  # Table 6: the critic is a LoRA adapter of its own (r 8, alpha 64), as the policy is
        eval_every=10, eval_size=500, save_every=10, eval_judge_prompt=PAPER_JUDGE_PROMPT,
        # The guide's share of rollins: PPO++ 0.6; AggreVaTeD 0.0 (Table 6 prints 1.0: all pi_theta rollins).
        ppo_pp=dict(beta=0.6), grpo_pp=dict(beta=0.6), aggrevated=dict(beta=0.0), beta_ppo_pp=0.6, beta_aggrevated=0.0,
        d2lols=dict(alpha=10),  # LOLS and D2LOLS were not run on TL;DR in the paper: 10% of the run, as IMDB's 20/100
        # reward_model.py (App. C.2, Table 6): the SFT model's trunk with LoRA r 32, alpha 32, one epoch
        reward_model=dict(dataset_name="CarperAI/openai_summarize_comparisons", lora_r=32, lora_alpha=32.0,
                          learning_rate=1e-5, batch_size=8, max_length=560, eval_size=2000),
    ),
}
# fmt: on


TLDR = "\nTL;DR:"  # how every prompt of the dataset ends: the summary follows


def fit_prompt(prompt, tokenizer, prompt_len):
    """A TL;DR prompt cut to prompt_len tokens as the authors cut it: the post loses its end and "\nTL;DR:" is put back,
    so the policy is always asked for the summary (cutting the whole prompt on the right would drop "TL;DR:")."""
    if len(tokenizer(prompt, add_special_tokens=False).input_ids) <= prompt_len:
        return prompt
    post = prompt[: -len(TLDR)] if prompt.endswith(TLDR) else prompt.rstrip().removesuffix("TL;DR:").rstrip()
    ids = tokenizer(post, add_special_tokens=False).input_ids
    keep = prompt_len - len(tokenizer(TLDR, add_special_tokens=False).input_ids)
    while keep > 0:  # the seam may tokenize differently: shorten until the whole fits
        fitted = tokenizer.decode(ids[:keep]) + TLDR
        if len(tokenizer(fitted, add_special_tokens=False).input_ids) <= prompt_len:
            return fitted
        keep -= 1
    check(False, f"--prompt-len {prompt_len} cannot hold the {TLDR.strip()!r} that ends a TL;DR prompt")


def load_tldr(dataset_name, tokenizer, prompt_len):
    """CarperAI/openai_summarize_tldr (train / valid / test of prompt, label) or a local directory in its format.
    Prompt = the post cut to --prompt-len tokens, ending in "\nTL;DR:" (fit_prompt): the policy, the reward model, the
    judge and ROUGE all see that text. Reference = " " + the label + EOS. Returns (pairs by split, references by
    prompt)."""
    ds = datasets_of(dataset_name, ("prompt", "label"), needed=("train", ("validation", "valid")))
    validation = "validation" if "validation" in ds else "valid"
    data, references = {}, {}
    for split, name in (("train", "train"), ("validation", validation), ("test", "test")):
        rows = []
        for prompt, label in zip(ds[name]["prompt"], ds[name]["label"]) if name in ds else []:
            check(
                isinstance(prompt, str) and isinstance(label, str),
                f"{dataset_name}: a {name} row has no prompt or label",
            )
            if label.strip():
                rows.append((fit_prompt(prompt, tokenizer, prompt_len), label.strip()))
        data[split] = [(prompt, " " + label + tokenizer.eos_token) for prompt, label in rows]
        references.update(rows)
    check(data["train"] and data["validation"], f"{dataset_name}: no train or validation row with a summary (label)")
    return data, {"references": references}


def datasets_of(name, columns, needed):
    """datasets.load_dataset(name), its problems in one line: a split or column missing, a file that is not text."""
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(datasets.logging.CRITICAL)  # its own report of a bad file: ours is one line
    try:
        ds = datasets.load_dataset(name)
    except Exception as e:  # noqa: BLE001 (a damaged file surfaces as many types: JSON, UTF-8, Arrow, an empty file)
        while e.__cause__ or e.__context__:  # datasets wraps the reason: the innermost error names it
            e = e.__cause__ or e.__context__
        reason = " ".join(str(e).split())[:300]
        raise UserError(f"dataset {name}: cannot be read ({type(e).__name__}: {reason})") from None
    for split in needed:
        options = split if isinstance(split, tuple) else (split,)
        check(any(s in ds for s in options), f"dataset {name} needs a '{options[-1]}' split ({', '.join(columns)})")
    for split in ds:
        missing = [c for c in columns if c not in ds[split].column_names]
        check(not missing, f"dataset {name}: its {split} split has no {', '.join(missing)} column")
    return ds


def load_comparisons(dataset_name):
    """CarperAI/openai_summarize_comparisons (prompt, chosen, rejected; chosen and rejected start with "TL;DR:") as
    {train, test: [(prompt + "\n" + chosen, prompt + "\n" + rejected)]}: the texts the reward model reads, in the
    same shape as the RL prompt + generation (the prompt there ends with "\nTL;DR:"). Identical pairs are dropped."""
    ds = datasets_of(dataset_name, ("prompt", "chosen", "rejected"), needed=("train", "test"))
    pairs = {}
    for split in ("train", "test"):
        rows = list(zip(ds[split]["prompt"], ds[split]["chosen"], ds[split]["rejected"]))
        check(all(isinstance(x, str) for row in rows for x in row), f"{dataset_name}: a {split} pair has a null value")
        pairs[split] = [(p + "\n" + c, p + "\n" + r) for p, c, r in rows if c != r]
        check(pairs[split], f"{dataset_name}: its {split} split has no pair (chosen differing from rejected)")
    return pairs


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
        check(name[len("openai:") :], "--eval-judge openai:MODEL needs the served model's name after openai:")
        chat = guides.openai_completer(
            name[len("openai:") :], base, 1.0, temperature=0.0, chat=True, where="$OPENAI_BASE_URL", role="judge"
        )
        chat.probe()
        return Judge(
            lambda prompts: [text for text, _ in chat(prompts, [JUDGE_MAX_TOKENS] * len(prompts))], template, seed
        )
    model = models.frozen(models.load_lm(name, device, dtype))
    tokenizer = models.load_tokenizer(name)
    complete = guides.local_completer(model, tokenizer, top_k=1, top_p=1.0)  # top-k 1: greedy

    def ask(prompts):
        context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        longest = max(len(tokenizer(p).input_ids) for p in prompts) + JUDGE_MAX_TOKENS if prompts else 0
        check(not context or longest <= context, f"--eval-judge {name}: the prompt and answer ({longest} tokens) are "
              f"longer than the judge's context ({context} tokens)")  # fmt: skip
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
