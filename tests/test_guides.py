"""Guides that continue text (guides.py): text-level restarts, a local LM with another tokenizer, and a real
OpenAI-compatible server (`transformers serve`) on 127.0.0.1 as the guide of ppo_pp.py and aggrevated.py."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import types

import pytest
import torch

import common
from conftest import run
from plumbing import decoding, guides, models
from test_cli import cli


def states(tokenizer, prompts, prefixes):
    query, query_mask = common.tokenize_prompts(tokenizer, prompts, 16, "left", "cpu")
    prefix, prefix_mask = decoding._left_pad(
        [torch.tensor(tokenizer(p, add_special_tokens=False).input_ids, dtype=torch.long) for p in prefixes],
        tokenizer.pad_token_id,
        "cpu",
    )
    return query, query_mask, prefix, prefix_mask


class Scripted:
    """A text continuer that records what it is asked and answers from a script: one (text, stopped) per call and
    state."""

    def __init__(self, *answers):
        self.answers, self.asked = list(answers), []

    def __call__(self, texts, max_tokens):
        self.asked.append((list(texts), list(max_tokens)))
        return [self.answers.pop(0) for _ in texts]


def test_text_restart_sends_the_exact_state_and_cuts_to_the_budget(tiny):
    """The guide receives prompt + kept prefix as the policy's tokenizer writes them; its text comes back as the
    policy's tokens of that text, cut to the budget; a guide that stops (EOS) before the minimum is asked to go on
    from where it stopped, and one that stops after it ends the sample with EOS."""
    tokenizer = models.load_tokenizer(tiny["lm"])
    query, query_mask, prefix, prefix_mask = states(tokenizer, ["the film", "a plot"], ["was", ""])
    complete = Scripted((" great fun and charming dull", False), (" bland", True), (" boring mess", True))
    guide = guides.text_guide(complete, tokenizer)
    tokens, lengths = guide(query, query_mask, prefix, prefix_mask, torch.tensor([3, 4]), torch.tensor([3, 3]))
    assert complete.asked[0] == ([" the film was", " a plot"], [3, 4])
    assert complete.asked[1] == ([" a plot bland"], [3])  # 1 token < the minimum 3: asked again, from the longer state
    ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    assert tokens[0, :3].tolist() == ids(" great fun and") and lengths[0] == 3  # cut to the budget 3
    assert (
        tokens[1, :4].tolist() == ids(" bland boring mess") + [tokenizer.eos_token_id] and lengths[1] == 4
    )  # stopped: EOS


def test_seam_share_counts_the_states_that_re_tokenize_otherwise(tiny):
    """A continuation glued to the kept prefix ("great" + "fun and": one unknown word as one text) re-tokenizes
    otherwise, one that starts with a space does not: the logged share is 1/2, then 0 once read (it is per row)."""
    tokenizer = models.load_tokenizer(tiny["lm"])
    query, query_mask, prefix, prefix_mask = states(tokenizer, ["the film", "a plot"], ["great", "great"])
    guide = guides.text_guide(Scripted(("fun and", False), (" fun and", False)), tokenizer)
    guide(query, query_mask, prefix, prefix_mask, torch.tensor([2, 2]), torch.tensor([2, 2]))
    # a word-level vocabulary has no "greatfun": that text cannot be kept, and is counted as changed too
    assert guides.seam_stats(guide) == {"rlgf/guide_seam_retokenized": 0.5, "rlgf/guide_seam_text_changed": 0.5}
    assert guides.seam_stats(guide) == {"rlgf/guide_seam_retokenized": 0.0, "rlgf/guide_seam_text_changed": 0.0}


def sentencepiece_tokenizer():
    """A SentencePiece-style tokenizer (Unigram pieces, a word-start marker \u2581 put before every text, as T5's and
    Llama's): "ely" alone becomes "\u2581ely", while "absolut" + "ely" is one word in the text."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tokenizer_models
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "</s>", "\u2581", "\n", "\u2581the", "\u2581film", "\u2581was", "\u2581absolut", "ely",
              "\u2581ely", "\u2581wonderful", "\u2581absolutely"]  # fmt: skip
    scores = [
        (p, 0.0 if i < 2 else -1.0 if p in ("\u2581ely", "\u2581absolutely") else -2.0) for i, p in enumerate(pieces)
    ]
    tok = Tokenizer(tokenizer_models.Unigram(scores, unk_id=0))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    tok.decoder = decoders.Metaspace(prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="</s>")


def test_the_seam_keeps_the_text_with_a_sentencepiece_tokenizer():
    """A prefix "absolut" continued by the guide's text "ely wonderful": tokenized alone it would gain a word-start
    marker ("absolut ely wonderful"); the restart keeps the text, "the film was absolutely wonderful", with the kept
    prefix's ids unchanged (only the tokenization differs from the whole text's: counted as retokenized, not as a text
    change)."""
    tokenizer = sentencepiece_tokenizer()
    ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    assert tokenizer.decode(ids("the film was absolut") + ids("ely wonderful")) == "the film was absolut ely wonderful"
    query, query_mask = torch.tensor([ids("the film")]), torch.ones(1, 2, dtype=torch.bool)
    prefix, prefix_mask = torch.tensor([ids("was absolut")]), torch.ones(1, 2, dtype=torch.bool)
    guide = guides.text_guide(Scripted(("ely wonderful", False)), tokenizer)
    tokens, lengths = guide(query, query_mask, prefix, prefix_mask, torch.tensor([2]), torch.tensor([2]))
    whole = tokenizer.decode(query[0].tolist() + prefix[0].tolist() + tokens[0, : lengths[0]].tolist())
    assert whole == "the film was absolutely wonderful"
    assert guides.seam_stats(guide) == {"rlgf/guide_seam_retokenized": 1.0, "rlgf/guide_seam_text_changed": 0.0}


def test_text_restart_through_generate_with_restarts_marks_the_guide_tokens(tiny):
    """A rollin by the guide (text path) to h then the policy: the first h tokens are the guide's re-tokenized text
    and by_guide marks exactly them; a rollout by the guide keeps the policy's prefix ids and marks the rest."""
    tokenizer = models.load_tokenizer(tiny["lm"])
    policy = models.load_lm(tiny["lm"], "cpu")
    guide = guides.text_guide(
        lambda texts, n: [(" great great great great great great", False)] * len(texts), tokenizer
    )
    samplers = {common.POLICY: decoding.sampler(policy, tokenizer, 0, 1.0), common.GUIDE: guide}
    query, query_mask, _, _ = states(tokenizer, ["the film", "a plot", "this movie"], ["", "", ""])
    great = tokenizer(" great", add_special_tokens=False).input_ids[0]
    rng = torch.Generator().manual_seed(0)
    out = common.generate_with_restarts(
        samplers,
        query,
        query_mask,
        torch.full((3,), common.GUIDE),
        torch.full((3,), common.POLICY),
        6,
        6,
        rng,
        tokenizer,
    )
    for r, b, h in zip(out["response"], out["by_guide"], out["restart_at"].tolist()):
        assert 1 <= h <= 5 and b.tolist() == [True] * h + [False] * (6 - h) and (r[:h] == great).all()
    out = common.generate_with_restarts(
        samplers,
        query,
        query_mask,
        torch.full((3,), common.POLICY),
        torch.full((3,), common.GUIDE),
        6,
        6,
        rng,
        tokenizer,
    )
    for r, b, h in zip(out["response"], out["by_guide"], out["restart_at"].tolist()):
        assert b.tolist() == [False] * h + [True] * (6 - h) and (r[h:] == great).all() and out["response_mask"].all()


def test_same_tokenizer_text_guide_gives_the_token_path_tokens(tiny):
    """A local LM with the policy's own tokenizer, run through the text path, samples the tokens the token-level
    sampler samples from the same states and random stream (the tiny tokenizer's decode and encode round-trip)."""
    tokenizer = models.load_tokenizer(tiny["lm"])
    model = models.load_lm(tiny["lm2"], "cpu")
    query, query_mask, prefix, prefix_mask = states(
        tokenizer, ["the film was", "a plot", "this movie is"], ["great and", "", "dull"]
    )
    budget = torch.tensor([5, 5, 5])
    torch.manual_seed(7)
    expected = decoding.sampler(model, tokenizer, 0, 1.0)(
        query, query_mask, prefix, prefix_mask, budget, torch.zeros_like(budget)
    )
    assert (expected[0] == tokenizer.eos_token_id).any()  # a row ended with the guide's own EOS
    torch.manual_seed(7)
    got = guides.text_guide(guides.local_completer(model, models.load_tokenizer(tiny["lm2"]), 0, 1.0), tokenizer)(
        query, query_mask, prefix, prefix_mask, budget, torch.zeros_like(budget)
    )
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def other_tokenizer_lm(tiny, path):
    """A causal LM whose tokenizer numbers the policy's words differently (another model family, in miniature)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tokenizer_models
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = models.load_tokenizer(tiny["lm"]).get_vocab()
    words = sorted(vocab, key=vocab.get)
    shuffled = {w: i for i, w in enumerate(words[:2] + words[2:][::-1])}  # the same words, other ids
    tok = Tokenizer(tokenizer_models.WordLevel(shuffled, unk_token="[UNK]"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace(prepend_scheme="never")
    other = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="[UNK]", pad_token="<|endoftext|>"
    )
    torch.manual_seed(5)
    config = GPT2Config(
        vocab_size=len(shuffled), n_positions=64, n_embd=16, n_layer=1, n_head=1, bos_token_id=0, eos_token_id=0
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    other.save_pretrained(path)
    return str(path)


def test_a_guide_with_another_tokenizer_continues_text(tiny, tmp_path):
    """A guide whose tokenizer differs from the policy's goes through the text path (no model comes back: its
    perplexities would be in other ids); ppo_pp.py trains with it, and logs the seam's re-tokenization share."""
    path = other_tokenizer_lm(tiny, tmp_path / "other")
    tokenizer = models.load_tokenizer(tiny["lm"])
    guide, model = models.load_guide(
        types.SimpleNamespace(guide_name=path, top_k=0, guide_top_p=1.0, guide_api_base=None, fast_decoding=False),
        tokenizer,
        {},
        "cpu",
        torch.float32,
    )
    assert model is None and hasattr(guide, "seam")
    _, rows = run("ppo_pp", tiny, tmp_path / "runs", guide_name=path, beta=1.0, num_iterations=1)
    assert (
        rows[1]["rlgf/guide_rollin_share"] == 1.0 and rows[1]["rlgf/guide_seam_retokenized"] == 0.0
    )  # word-level: no seam
    assert "eval/guide_reward" in rows[0] and "eval/guide_perplexity" not in rows[0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVING = all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn", "openai"))


@pytest.fixture(scope="module")
def server(tiny):
    """`transformers serve` on 127.0.0.1 serving the tiny causal LM: a real OpenAI-compatible server."""
    if not SERVING:
        pytest.skip("the served-guide test needs transformers' serving extras: pip install openai fastapi uvicorn")
    port = free_port()
    cli = os.path.join(os.path.dirname(sys.executable), "transformers")
    process = subprocess.Popen(
        [cli, "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", tiny["lm"]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import urllib.request

    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert process.poll() is None, "transformers serve exited"
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize("name", ["ppo_pp", "aggrevated"])
def test_served_guide_drives_a_run(name, tiny, tmp_path, server, monkeypatch):
    """ppo_pp.py and aggrevated.py train for an iteration with the served model as their guide (openai:MODEL); the
    API key ($OPENAI_API_KEY) appears nowhere in the run directory."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-0123456789")
    run_dir, rows = run(
        name,
        tiny,
        tmp_path,
        guide_name=f"openai:{tiny['lm']}",
        guide_api_base=server,
        beta=1.0 if name == "ppo_pp" else 0.0,
        num_iterations=1,
    )
    assert "eval/guide_reward" in rows[0] and isinstance(rows[1]["loss/policy"], float)
    if name == "ppo_pp":
        assert rows[1]["rlgf/guide_rollin_share"] == 1.0
    else:
        assert rows[1]["rlgf/policy_token_share"] < 1.0  # the guide rolled out after every restart
    for folder, _, files in os.walk(run_dir):
        for f in files:
            with open(os.path.join(folder, f), "rb") as handle:
                assert b"sk-test-secret" not in handle.read(), f
    with open(os.path.join(run_dir, "args.json")) as f:
        assert json.load(f)["guide_api_base"] == server


def test_served_guide_errors_are_one_line(tiny, tmp_path, server):
    """An endpoint nobody listens on, and a server that refuses the request (a model it does not serve): one line,
    exit status 2, no traceback."""
    flags = [
        "ppo_pp.py",
        "--task",
        "imdb",
        "--dataset-name",
        tiny["imdb"],
        "--model-name",
        tiny["lm"],
        "--reward-model-name",
        tiny["classifier"],
        "--eval-lm-name",
        tiny["lm"],
        "--output-dir",
        str(tmp_path),
        "--eval-size",
        "4",
    ]
    for guide, api_base, expected in (
        (f"openai:{tiny['lm']}", f"http://127.0.0.1:{free_port()}/v1", "the guide's server cannot be reached"),
        ("openai:no-such-model", server, "the guide's server refused the request"),
    ):
        out, _ = cli(*flags, "--guide-name", guide, "--guide-api-base", api_base)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert out.stderr.strip().splitlines()[-1].startswith("error: --guide-api-base") and expected in out.stderr, (
            out.stderr[-2000:]
        )
