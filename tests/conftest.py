"""Tiny local assets built in the test session (no hub, no download): a word-level tokenizer, a 2-layer GPT-2, a
2-layer DistilBERT sentiment classifier and an IMDB-format dataset directory. They go through the same loading code
as the paper's gpt2 / lvwerra/distilbert-imdb / stanfordnlp/imdb."""

import dataclasses
import importlib
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

POSITIVE = "great wonderful superb moving brilliant fun charming delightful".split()
NEGATIVE = "awful dull boring terrible mess tedious bland clumsy".split()
NEUTRAL = "the a film movie story plot actors scene this is was and of it with but".split()


def _review(rng, positive):
    words = [NEUTRAL[i] for i in torch.randint(len(NEUTRAL), (16,), generator=rng).tolist()]
    mood = POSITIVE if positive else NEGATIVE
    for i in torch.randint(16, (4,), generator=rng).tolist():
        words[i] = mood[torch.randint(len(mood), (1,), generator=rng).item()]
    return " ".join(words)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tokenizer_models
    from transformers import PreTrainedTokenizerFast

    words = [
        "\u2581" + w for w in [*POSITIVE, *NEGATIVE, *NEUTRAL, ".", ","]
    ]  # Metaspace marks word starts with \u2581
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "[UNK]", *words])}
    tok = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace(prepend_scheme="never")  # keep the space before a continuation
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        unk_token="[UNK]",
        pad_token="<|endoftext|>",
        model_max_length=512,
    )


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of the tiny assets: lm (causal LM dir), lm2 (another causal LM, a different guide), classifier, imdb,
    t5 (an encoder-decoder), common_gen (a CommonGen-format dataset directory), tldr and comparisons (TL;DR-format
    summaries and preference pairs)."""
    from transformers import (
        DistilBertConfig,
        DistilBertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        T5Config,
        T5ForConditionalGeneration,
    )

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = _tokenizer()
    paths = {}
    for name, seed in (("lm", 0), ("lm2", 1)):
        torch.manual_seed(seed)
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=128,
            n_embd=32,
            n_layer=2,
            n_head=2,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        GPT2LMHeadModel(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    torch.manual_seed(2)
    config = DistilBertConfig(
        vocab_size=len(tokenizer),
        dim=32,
        hidden_dim=64,
        n_layers=2,
        n_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    DistilBertForSequenceClassification(config).save_pretrained(root / "classifier")
    tokenizer.save_pretrained(root / "classifier")
    paths["classifier"] = str(root / "classifier")
    rng = torch.Generator().manual_seed(3)
    (root / "imdb").mkdir()
    for split, n in (("train", 64), ("test", 48)):
        with open(root / "imdb" / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"text": _review(rng, i % 2 == 0), "label": i % 2 == 0}) + "\n")
    paths["imdb"] = str(root / "imdb")
    torch.manual_seed(4)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=0,
        decoder_start_token_id=0,
    )
    T5ForConditionalGeneration(config).save_pretrained(root / "t5")
    tokenizer.save_pretrained(root / "t5")
    paths["t5"] = str(root / "t5")
    (root / "common_gen").mkdir()
    words = POSITIVE + NEGATIVE
    for split, sets in (("train", 24), ("validation", 8)):
        with open(root / "common_gen" / f"{split}.jsonl", "w") as f:
            for i in range(sets):
                concepts = sorted({words[j] for j in torch.randint(len(words), (3 + i % 3,), generator=rng).tolist()})
                for k in range(2):  # two reference sentences per concept set, like CommonGen
                    f.write(
                        json.dumps(
                            {
                                "concept_set_idx": i,
                                "concepts": concepts,
                                "target": f"the film {' and '.join(concepts)} {NEUTRAL[k]}",
                            }
                        )
                        + "\n"
                    )
    paths["common_gen"] = str(root / "common_gen")
    (root / "tldr").mkdir()  # CarperAI/openai_summarize_tldr's format: a post, a line "TL;DR:", the summary
    for split, n in (("train", 32), ("valid", 16), ("test", 8)):
        with open(root / "tldr" / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(
                    json.dumps(
                        {
                            "prompt": f"POST: {_review(rng, i % 2 == 0)}\nTL;DR:",
                            "label": " ".join(_review(rng, i % 2 == 0).split()[:5]),
                        }
                    )
                    + "\n"
                )
    paths["tldr"] = str(root / "tldr")
    (
        root / "comparisons"
    ).mkdir()  # CarperAI/openai_summarize_comparisons' format: the chosen summary is the positive one
    for split, n in (("train", 64), ("test", 32)):
        with open(root / "comparisons" / f"{split}.jsonl", "w") as f:
            for i in range(n):
                good, bad = (
                    " ".join(w for w in _review(rng, positive).split() if w in POSITIVE + NEGATIVE)
                    for positive in (True, False)
                )
                f.write(
                    json.dumps(
                        {
                            "prompt": f"POST: {_review(rng, i % 2 == 0)}",
                            "chosen": f"TL;DR: {good}",
                            "rejected": f"TL;DR: {bad}",
                        }
                    )
                    + "\n"
                )
    paths["comparisons"] = str(root / "comparisons")
    return paths


def script(name):
    """A fresh import of one algorithm script (ppo, ppo_pp, aggrevated, lols, d2lols, sft)."""
    sys.modules.pop(name, None)
    return importlib.import_module(name)


def args_for(module, task, **values):
    """The script's Args for --task `task` (its preset over the script's defaults, as the command line has them), with
    `values` over them."""
    import tasks

    fields = module.Args.__dataclass_fields__
    return dataclasses.replace(tasks.defaults(module.Args, task), **{k: v for k, v in values.items() if k in fields})


def tiny_args(module, tiny, tmp_path, **overrides):
    """The script's Args on the imdb code path with the tiny assets and a budget of seconds."""
    values = dict(
        task="imdb",
        dataset_name=tiny["imdb"],
        model_name=tiny["lm"],
        reward_model_name=tiny["classifier"],
        eval_lm_name=tiny["lm"],
        output_dir=str(tmp_path),
        device="cpu",
        prompt_len=8,
        max_new_tokens=6,
        min_new_tokens=6,
        num_iterations=2,
        rollouts_per_iteration=8,
        minibatch_size=4,
        ppo_epochs=2,
        learning_rate=1e-3,
        eval_every=1,
        eval_size=8,
        save_every=0,
    )
    values.update(overrides)
    if (
        module.__name__ == "d2lols" and "alpha" not in overrides
    ):  # the preset's switch (imdb: 20) is beyond a tiny run's end
        values["alpha"] = min(1, values["num_iterations"])
    return args_for(module, values.pop("task"), **values)


def run(name, tiny, tmp_path, **overrides):
    """Run one script end to end; returns (run directory, metrics rows)."""
    module = script(name)
    args = tiny_args(module, tiny, tmp_path, **overrides)
    module.main(args)
    (run_dir,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path) if d.startswith(f"{args.task}__")]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return run_dir, [json.loads(line) for line in f]


def stopped_then_resumed(name, tiny, tmp_path, monkeypatch, **overrides):
    """Run the script uninterrupted; run it again, stopped by an exception right after its first checkpoint (pass
    save_every=1), and resume that run. Returns (straight run dir, its rows, resumed run dir, its rows)."""
    from plumbing import runs

    straight_dir, straight = run(name, tiny, tmp_path / "straight", **overrides)
    save = runs.save_checkpoint

    def save_then_stop(*args):
        save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(name, tiny, tmp_path / "stopped", **overrides)
    monkeypatch.setattr(runs, "save_checkpoint", save)
    (run_dir,) = [os.path.join(tmp_path / "stopped", d) for d in os.listdir(tmp_path / "stopped")]
    module = script(name)
    module.main(tiny_args(module, tiny, tmp_path / "stopped", resume=run_dir, **overrides))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return straight_dir, straight, run_dir, [json.loads(line) for line in f]


GUIDE_TOKEN = 2  # "great": the fake black-box guide below emits only this token


def constant_guide(query, query_mask, prefix, prefix_mask, max_new, min_new):
    """A black-box guide (`--guide-name conftest:constant_guide`): continues every state with GUIDE_TOKEN."""
    steps = int(max_new.max()) if len(max_new) else 0
    return torch.full((len(query), steps), GUIDE_TOKEN, dtype=torch.long, device=query.device), max_new.clone()


@pytest.fixture
def spy(monkeypatch):
    """Records what the scripts pass to the shared helpers: every rollout, the policy mask of each iteration (the union
    of the masks it whitens over) and the mask of every masked_mean that makes a term of the loss, in order ("rollout"
    marks where an iteration starts)."""
    import common

    seen = {"rollouts": [], "policy_masks": [], "masked_means": []}
    generate, whiten, mean = common.generate_with_restarts, common.masked_whiten, common.masked_mean

    def generate_spy(*args, **kwargs):
        out = generate(*args, **kwargs)
        seen["rollouts"].append({k: v.clone() for k, v in out.items()})
        seen["policy_masks"].append(torch.zeros_like(out["response_mask"]))
        seen["masked_means"].append("rollout")
        return out

    def whiten_spy(x, mask, *args):
        seen["policy_masks"][-1] |= mask.bool()
        monkeypatch.setattr(common, "masked_mean", mean)  # whitening's own means are not recorded
        try:
            return whiten(x, mask, *args)
        finally:
            monkeypatch.setattr(common, "masked_mean", mean_spy)

    def mean_spy(x, mask, *whole):
        if torch.is_grad_enabled() and x.requires_grad:  # the terms of the loss, not the logged statistics
            seen["masked_means"].append(mask.detach().clone())
        return mean(x, mask, *whole)

    monkeypatch.setattr(common, "generate_with_restarts", generate_spy)
    monkeypatch.setattr(common, "masked_whiten", whiten_spy)
    monkeypatch.setattr(common, "masked_mean", mean_spy)
    return seen


class PositiveWords:
    """A reward a tiny policy can learn in a few iterations: the share of a generation's words that are POSITIVE.
    Appends ("reward", scores) to `events` at every call."""

    def __init__(self, events):
        self.events = events

    def __call__(self, prompts, generations):
        scores = torch.tensor([sum(w in POSITIVE for w in g.split()) / max(1, len(g.split())) for g in generations])
        self.events.append(("reward", scores))
        return scores


@pytest.fixture
def recorder(monkeypatch):
    """Swaps the task reward for PositiveWords and records, in order, what one run passes through the shared helpers:
    each rollout (its arguments and outputs), each forward pass (model, inputs, outputs), each minibatch order and each
    loss that is backpropagated. A test can then recompute the whole objective by hand."""
    import common
    import tasks

    events = []
    reward = PositiveWords(events)
    generate, forward, randperm, backward = (
        common.generate_with_restarts,
        common.forward,
        torch.randperm,
        torch.Tensor.backward,
    )

    def generate_spy(samplers, query, query_mask, rollin_by, rollout_by, *args, **kwargs):
        out = generate(samplers, query, query_mask, rollin_by, rollout_by, *args, **kwargs)
        events.append(
            (
                "rollout",
                dict(
                    query=query.clone(),
                    rollin_by=rollin_by.clone(),
                    rollout_by=rollout_by.clone(),
                    scores=None,
                    **{k: v.clone() for k, v in out.items()},
                ),
            )
        )
        return out

    def forward_spy(model, value_head, query, query_mask, response, response_mask, **kwargs):
        out = forward(model, value_head, query, query_mask, response, response_mask, **kwargs)
        events.append(
            (
                "forward",
                dict(
                    model=model,
                    head=value_head is not None,
                    grad=torch.is_grad_enabled(),
                    query=query.clone(),
                    response=response.clone(),
                    response_mask=response_mask.clone(),
                    logprobs=out[0].detach().clone(),
                    values=None if out[1] is None else out[1].detach().clone(),
                ),
            )
        )
        return out

    def randperm_spy(*args, **kwargs):
        out = randperm(*args, **kwargs)
        events.append(("randperm", out.clone()))
        return out

    def backward_spy(self, *args, **kwargs):
        events.append(("backward", self.item()))
        return backward(self, *args, **kwargs)

    monkeypatch.setattr(common, "generate_with_restarts", generate_spy)
    monkeypatch.setattr(common, "forward", forward_spy)
    monkeypatch.setattr(tasks, "load_reward", lambda *args: reward)
    monkeypatch.setattr(torch, "randperm", randperm_spy)
    monkeypatch.setattr(torch.Tensor, "backward", backward_spy)
    return events


def iterations(events):
    """The recorded events of each training iteration: its rollout (with the task scores it got), the forward passes
    of the score step (old, reference), the minibatch order, and per minibatch step its two forward passes (policy and
    value, MLE) and the loss that was backpropagated."""
    out, current = [], None
    for kind, data in events:
        if kind == "rollout":
            current = dict(rollout=data, score_forwards=[], perms=[], steps=[])
            out.append(current)
        elif current is None:  # the evaluation before training
            continue
        elif kind == "reward" and current["rollout"]["scores"] is None:
            current["rollout"]["scores"] = data
        elif kind == "forward" and len(current["score_forwards"]) < 2:
            current["score_forwards"].append(data)
        elif kind == "randperm":
            current["perms"].append(data)
        elif kind == "forward" and data["grad"]:
            if data["head"]:
                current["steps"].append(dict(new=data))
            else:
                current["steps"][-1]["mle"] = data
        elif kind == "backward":
            current["steps"][-1]["loss"] = data
    return out  # (no-grad forward passes after the score step are evaluations: left out)
