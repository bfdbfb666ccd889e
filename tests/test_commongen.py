"""CommonGen: encoder-decoder policies (a tiny T5) through the same helpers and scripts, on a CommonGen-format fixture
(its metrics and the offline `concepts` data: test_tasks.py)."""

import os
import types

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

import common
from common import GUIDE, NO_ROLLIN, POLICY
from conftest import run
from plumbing import decoding, models


@pytest.fixture(scope="module")
def t5(tiny):
    return models.load_lm(tiny["t5"], "cpu"), models.load_tokenizer(tiny["t5"])


def test_t5_forward_matches_unpadded(t5):
    """Log-probs of decoder tokens from a padded batch equal per-sample unpadded forward passes."""
    model, _ = t5
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11, 12], [13, 14]]
    query, query_mask = decoding._left_pad([torch.tensor(p) for p in prompts], 0, "cpu")
    response = torch.tensor([[10, 11, 12], [13, 14, 0]])
    response_mask = torch.tensor([[True, True, True], [True, True, False]])
    head = torch.nn.Linear(model.config.d_model, 2)
    logprobs, values = common.forward(model, head, query, query_mask, response, response_mask)
    assert values.shape == (2, 3, 2)
    with torch.no_grad():
        for i, (p, r) in enumerate(zip(prompts, responses)):
            out = model(input_ids=torch.tensor([p]), decoder_input_ids=torch.tensor([[0] + r[:-1]]))
            expected = out.logits[0].log_softmax(-1).gather(1, torch.tensor(r)[:, None]).squeeze(1)
            torch.testing.assert_close(logprobs[i, : len(r)], expected, atol=1e-5, rtol=0)


def test_t5_restart_keeps_the_decoder_prefix(t5):
    """Restarting on the decoder (one prefill of [start] + the kept prefix) continues exactly like an uninterrupted
    greedy decode, and the kept prefix is the rollin's."""
    model, tokenizer = t5
    samplers = {who: decoding.sampler(model, tokenizer, 0, 1.0, greedy=True) for who in (POLICY, GUIDE)}
    query, query_mask = decoding._left_pad([torch.tensor(p) for p in ([4, 5, 6], [7, 8], [9, 10, 11, 12])], 0, "cpu")
    n, budget = 6, torch.full((3,), 6)
    plain, _ = decoding.sample(
        model, query, query_mask, query[:, :0], query_mask[:, :0], budget, budget, greedy=True, eos_id=0
    )
    out = common.generate_with_restarts(
        samplers,
        query,
        query_mask,
        torch.tensor([POLICY, GUIDE, NO_ROLLIN]),
        torch.tensor([GUIDE, POLICY, POLICY]),
        n,
        n,
        torch.Generator().manual_seed(0),
        types.SimpleNamespace(pad_token_id=0, eos_token_id=None),
    )
    assert torch.equal(out["response"], plain)
    h = out["restart_at"]
    assert (h[:2] >= 1).all() and h[2] == 0
    assert out["by_guide"][0].tolist() == [t >= h[0] for t in range(n)] and out["by_guide"][1].tolist() == [
        t < h[1] for t in range(n)
    ]


def test_t5_beam_search_evaluation(t5):
    model, tokenizer = t5
    query, query_mask = decoding._left_pad([torch.tensor(p) for p in ([4, 5, 6], [7, 8])], 0, "cpu")
    beams = decoding.sampler(model, tokenizer, 0, 1.0, num_beams=5)
    tokens, lengths = beams(
        query, query_mask, query[:, :0], query_mask[:, :0], torch.full((2,), 6), torch.full((2,), 2)
    )
    assert ((lengths >= 2) & (lengths <= 6)).all()
    expected = model.generate(
        input_ids=query, attention_mask=query_mask.long(), num_beams=5, max_new_tokens=6, min_new_tokens=2
    )
    for i in range(2):
        assert tokens[i, : lengths[i]].tolist() == expected[i, 1 : 1 + lengths[i]].tolist()


def commongen_flags(tiny):
    return dict(
        task="commongen",
        dataset_name=tiny["common_gen"],
        model_name=tiny["t5"],
        eval_lm_name=tiny["t5"],
        reward_model_name="cider-d",
        prompt_len=12,
        max_new_tokens=6,
        min_new_tokens=2,
    )


@pytest.mark.parametrize("name", ["ppo", "ppo_pp", "aggrevated", "lols", "d2lols"])
def test_commongen_scripts_end_to_end_with_t5(tiny, tmp_path, name):
    """All five scripts train a tiny T5 on a local CommonGen-format fixture; evaluation is beam search."""
    extra = {"alpha": 1} if name == "d2lols" else {}
    run_dir, metrics = run(name, tiny, tmp_path, eval_every=0, **commongen_flags(tiny), **extra)
    for key in ("eval/reward", "eval/cider", "eval/bleu4", "eval/cider_easy", "eval/cider_hard", "eval/perplexity"):
        assert key in metrics[0] and key in metrics[-1]
    assert metrics[-1]["iteration"] == 2 and metrics[1]["train/response_length"] >= 2
    trained = AutoModelForSeq2SeqLM.from_pretrained(os.path.join(run_dir, "checkpoint"))
    start = AutoModelForSeq2SeqLM.from_pretrained(tiny["t5"])
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), start.state_dict().values()))


def test_sft_on_commongen_pairs(tiny, tmp_path):
    _, metrics = run(
        "sft", tiny, tmp_path, num_epochs=2.0, batch_size=8, sft_learning_rate=1e-2, **commongen_flags(tiny)
    )
    assert metrics[-1]["eval/perplexity"] < metrics[0]["eval/perplexity"]
