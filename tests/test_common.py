"""Unit tests of common.py: GAE, whitening, sampling, logit filtering, generation with restarts, batching, the
forward pass, the guide check and the training state (the tasks' data and rewards: test_tasks.py). Everything runs
offline on CPU in seconds."""

import os
import random
import types
from collections import Counter

import pytest
import torch

import common
from common import GUIDE, NO_ROLLIN, POLICY
from plumbing import UserError, decoding, models


# ---------------------------------------------------------------------------------------------------------------
# GAE, whitening, masked mean
# ---------------------------------------------------------------------------------------------------------------
def _gae_reference(rewards, values, lengths, gamma, lam):
    """Plain per-sample loop over the real length L only, V(s_L) = 0."""
    batch, n = rewards.shape
    advantages = torch.zeros(batch, n, dtype=torch.float64)
    for i in range(batch):
        L = lengths[i]
        running = 0.0
        for t in reversed(range(L)):
            next_value = values[i, t + 1].item() if t + 1 < L else 0.0
            delta = rewards[i, t].item() + gamma * next_value - values[i, t].item()
            running = delta + gamma * lam * running
            advantages[i, t] = running
    return advantages


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (0.5, 0.7)])
@pytest.mark.parametrize("bool_mask", [True, False])
def test_gae_matches_per_sample_reference(gamma, lam, bool_mask):
    """gae == a per-sample backward loop over each response's real length; 0 outside the mask; returns = A + V."""
    g = torch.Generator().manual_seed(0)
    batch, n = 7, 9
    lengths = [9, 1, 5, 0, 3, 8, 2]
    rewards = torch.randn(batch, n, generator=g, dtype=torch.float64)
    values = torch.randn(batch, n, generator=g, dtype=torch.float64)  # garbage after L must be ignored
    mask = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    advantages, returns = common.gae(rewards, values, mask if bool_mask else mask.double(), gamma, lam)
    expected = _gae_reference(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(advantages, expected, atol=1e-6, rtol=0)
    assert (advantages[~mask] == 0).all()
    torch.testing.assert_close(returns[mask], (advantages + values)[mask], atol=1e-6, rtol=0)


def test_gae_float32_gamma_one_is_reward_to_go_minus_value():
    """With gamma = lam = 1 the advantage is the undiscounted reward-to-go minus V(s_t) (float32 inputs)."""
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0], [0.5, 2.0, 0.0, 0.0]])
    values = torch.tensor([[0.1, 0.2, 0.3, 9.0], [1.0, -1.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    advantages, returns = common.gae(rewards, values, mask, 1.0, 1.0)
    expected = torch.tensor([[1.0 - 0.1, 1.0 - 0.2, 1.0 - 0.3, 0.0], [2.5 - 1.0, 2.0 + 1.0, 0.0, 0.0]])
    torch.testing.assert_close(advantages, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(returns[mask], torch.tensor([1.0, 1.0, 1.0, 2.5, 2.0]), atol=1e-6, rtol=0)


def test_masked_whiten_statistics_and_formula():
    """Over the mask: mean 0, unbiased std 1, equal to (x - mean) / std computed directly; 0 outside the mask."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 11, generator=g, dtype=torch.float64) * 3 + 2
    mask = torch.rand(6, 11, generator=g) < 0.6
    mask[0, 0] = True
    x[~mask] = 1e6  # values outside the mask must not leak into the statistics
    out = common.masked_whiten(x, mask)
    inside = out[mask]
    assert abs(inside.mean().item()) < 1e-6
    assert abs(inside.std().item() - 1) < 1e-6
    assert (out[~mask] == 0).all()
    direct = (x[mask] - x[mask].mean()) / x[mask].std()
    torch.testing.assert_close(inside, direct, atol=1e-6, rtol=0)


def test_masked_whiten_float_mask_float32():
    """A 0/1 float mask works like a bool mask (float32, as the scripts use it)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0]] * 4, dtype=torch.bool)
    torch.testing.assert_close(common.masked_whiten(x, mask.float()), common.masked_whiten(x, mask))
    direct = (x[mask] - x[mask].mean()) / x[mask].std()
    torch.testing.assert_close(common.masked_whiten(x, mask)[mask], direct, atol=1e-5, rtol=0)


def test_masked_mean_values_and_empty_mask():
    """masked_mean averages only masked entries; an empty mask gives 0, not NaN."""
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, float(50), 4.0]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    assert common.masked_mean(x, mask).item() == pytest.approx(2.5)
    empty = common.masked_mean(x, torch.zeros_like(mask))
    assert not torch.isnan(empty)
    assert empty.item() == 0.0


# ---------------------------------------------------------------------------------------------------------------
# _filter_logits
# ---------------------------------------------------------------------------------------------------------------
def test_top_k_keeps_exactly_k_largest():
    """top_k leaves exactly the k largest logits finite (distinct logits), others -inf; top_k=0 is off."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 30, generator=g)
    for k in (1, 4, 29):
        out = decoding._filter_logits(logits.clone(), k, 1.0)
        finite = torch.isfinite(out)
        assert (finite.sum(-1) == k).all()
        top = torch.topk(logits, k, -1).indices
        assert finite.gather(1, top).all()
        torch.testing.assert_close(out[finite], logits[finite])
    assert torch.equal(decoding._filter_logits(logits.clone(), 0, 1.0), logits)
    assert torch.equal(decoding._filter_logits(logits.clone(), 30, 1.0), logits)


@pytest.mark.parametrize("p,kept", [(0.3, 1), (0.49, 1), (0.51, 2), (0.7, 2), (0.8, 2), (0.81, 3), (0.96, 4), (1.0, 4)])
def test_top_p_keeps_smallest_prefix_reaching_p(p, kept):
    """top_p keeps the smallest prefix of the sorted distribution whose mass reaches p (unsorted input)."""
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])  # sorted: 0.5, 0.3, 0.15, 0.05
    out = decoding._filter_logits(probs.log(), 0, p)
    finite = torch.isfinite(out)[0]
    assert finite.sum().item() == kept
    order = torch.argsort(probs[0], descending=True)
    assert finite[order[:kept]].all() and not finite[order[kept:]].any()


@pytest.mark.parametrize(
    "probs,p", [([0.5, 0.25, 0.125, 0.125], 0.75), ([0.5, 0.25, 0.125, 0.125], 0.5), ([0.15, 0.5, 0.05, 0.3], 0.5)]
)
def test_top_p_exact_boundary(probs, p):
    """Exact-in-float masses: when the sorted prefix's mass equals p exactly, nothing after that prefix is kept."""
    sorted_probs = sorted(probs, reverse=True)
    kept = next(i + 1 for i in range(len(probs)) if sum(sorted_probs[: i + 1]) >= p)
    out = decoding._filter_logits(torch.tensor([probs]).log(), 0, p)
    assert torch.isfinite(out).sum().item() == kept


def test_top_p_always_keeps_argmax_and_combines_with_top_k():
    """Even p = 0 keeps the argmax; top_k then top_p never leaves a row without a finite logit."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(8, 20, generator=g)
    for p in (0.0, 1e-6, 0.2):
        out = decoding._filter_logits(logits.clone(), 0, p)
        assert torch.isfinite(out.gather(1, logits.argmax(-1, keepdim=True))).all()
        assert (torch.isfinite(out).sum(-1) >= 1).all()
    out = decoding._filter_logits(logits.clone(), 5, 0.9)
    n = torch.isfinite(out).sum(-1)
    assert ((n >= 1) & (n <= 5)).all()


# ---------------------------------------------------------------------------------------------------------------
# sample, with the tiny GPT-2
# ---------------------------------------------------------------------------------------------------------------
EOS = 0


@pytest.fixture(scope="module")
def lm(tiny):
    return models.load_lm(tiny["lm"], "cpu")


class Recorder:
    """Wraps a causal LM: records every call's input_ids shape, KV cache and last-position logits; optionally
    boosts EOS: boost(call_index) -> a [B] tensor added to the EOS logit of that call's last position (or None).
    (The tiny random GPT-2 mostly predicts its current input token, so comparing logits, not just greedy tokens, is
    what makes the padding and cache checks bite.)"""

    def __init__(self, model, boost=None):
        self.model, self.boost, self.calls = model, boost, []
        self.config = model.config

    def get_base_model(self):  # what the sampler inspects for the model's forward signature (logits_to_keep)
        return self.model

    def __call__(self, **kwargs):
        out = self.model(**kwargs)
        self.calls.append(
            dict(
                shape=tuple(kwargs["input_ids"].shape),
                past=kwargs.get(decoding.CACHE),
                logits=out.logits[:, -1].clone(),
            )
        )
        if self.boost is not None:
            extra = self.boost(len(self.calls) - 1)
            if extra is not None:
                out.logits[:, -1, EOS] += extra
        return out


def _ids(rows, pad=0):
    """Left-padded prompts and an empty response prefix: the arguments of decoding.sample before the budgets."""
    ids, mask = decoding._left_pad([torch.tensor(r) for r in rows], pad, "cpu")
    return ids, mask, ids[:, :0], mask[:, :0]


def _budget(*values):
    return torch.tensor(values, dtype=torch.long)


def test_sample_left_padding_does_not_change_greedy_tokens(lm):
    """A prompt sampled alone equals the same prompt left-padded in a batch beside a longer prompt (greedy): same
    tokens, and the same next-token logits at every step."""
    short, long = [5, 9, 13], [20, 3, 7, 8, 30, 2, 11]
    rec_alone, rec_batch, rec_long = Recorder(lm), Recorder(lm), Recorder(lm)
    alone, alone_len = decoding.sample(rec_alone, *_ids([short]), _budget(8), _budget(8), greedy=True, eos_id=EOS)
    batch, batch_len = decoding.sample(
        rec_batch, *_ids([long, short]), _budget(8, 8), _budget(8, 8), greedy=True, eos_id=EOS
    )
    long_alone, _ = decoding.sample(rec_long, *_ids([long]), _budget(8), _budget(8), greedy=True, eos_id=EOS)
    assert torch.equal(batch[1], alone[0]) and batch_len[1] == alone_len[0] == 8
    assert torch.equal(batch[0], long_alone[0])
    assert len(rec_batch.calls) == len(rec_alone.calls) == 8
    for in_batch, by_itself, longer in zip(rec_batch.calls, rec_alone.calls, rec_long.calls):
        torch.testing.assert_close(in_batch["logits"][1], by_itself["logits"][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(in_batch["logits"][0], longer["logits"][0], atol=1e-5, rtol=0)


def test_sample_per_sample_budgets(lm):
    """max_new = [1, 3, 5]: each length <= its budget, pad_id after it, the tensor as wide as the largest budget."""
    pad = 35
    prompts = [[4, 5, 6], [7, 8], [9, 10, 11, 12]]
    torch.manual_seed(0)
    tokens, lengths = decoding.sample(
        lm, *_ids(prompts), _budget(1, 3, 5), _budget(0, 0, 0), top_k=10, eos_id=EOS, pad_id=pad
    )
    assert tokens.shape == (3, 5)
    assert (lengths <= _budget(1, 3, 5)).all() and (lengths >= 1).all()
    for row, n in zip(tokens, lengths.tolist()):
        assert (row[n:] == pad).all()
        assert (row[: n - 1] != EOS).all()  # only the last real token may be the EOS
        assert (row[:n] != pad).all()
    # Greedy with min = max: every sample uses exactly its own budget.
    tokens, lengths = decoding.sample(
        lm, *_ids(prompts), _budget(1, 3, 5), _budget(1, 3, 5), greedy=True, eos_id=EOS, pad_id=pad
    )
    assert lengths.tolist() == [1, 3, 5]
    assert (tokens[0, 1:] == pad).all() and (tokens[1, 3:] == pad).all()


def test_sample_min_new_forbids_early_eos(lm):
    """With EOS overwhelmingly likely: min_new = 0 stops at 1 token, min_new = max_new never stops early,
    min_new = 2 stops right at 3 tokens (the EOS is the 3rd)."""
    prompts = [[4, 5, 6], [7, 8], [9, 10, 11, 12]]
    pad = 35
    boosted = Recorder(lm, boost=lambda call: torch.full((3,), 1e4))
    for greedy in (True, False):
        torch.manual_seed(1)
        _, lengths = decoding.sample(
            boosted, *_ids(prompts), _budget(5, 5, 5), _budget(0, 0, 0), greedy=greedy, eos_id=EOS, pad_id=pad
        )
        assert lengths.tolist() == [1, 1, 1]
        tokens, lengths = decoding.sample(
            boosted, *_ids(prompts), _budget(5, 5, 5), _budget(5, 5, 5), greedy=greedy, eos_id=EOS, pad_id=pad
        )
        assert lengths.tolist() == [5, 5, 5]
        assert (tokens != EOS).all()
        tokens, lengths = decoding.sample(
            boosted, *_ids(prompts), _budget(5, 5, 5), _budget(2, 2, 2), greedy=greedy, eos_id=EOS, pad_id=pad
        )
        assert lengths.tolist() == [3, 3, 3]
        assert (tokens[:, 2] == EOS).all() and (tokens[:, :2] != EOS).all() and (tokens[:, 3:] == pad).all()


def test_sample_model_eos_counts_and_pads_after(lm):
    """An EOS the model picks (row 1, step 2) is the last counted token, pad_id follows; other rows are unaffected."""
    prompts = [[4, 5, 6], [7, 8], [9, 10, 11, 12]]
    pad = 35
    plain, plain_len = decoding.sample(
        lm, *_ids(prompts), _budget(6, 6, 6), _budget(0, 0, 0), greedy=True, eos_id=EOS, pad_id=pad
    )
    assert plain_len.tolist() == [6, 6, 6], "the tiny model should not pick EOS greedily here"
    boost = Recorder(lm, boost=lambda call: torch.tensor([0.0, 1e4, 0.0]) if call == 2 else None)
    tokens, lengths = decoding.sample(
        boost, *_ids(prompts), _budget(6, 6, 6), _budget(0, 0, 0), greedy=True, eos_id=EOS, pad_id=pad
    )
    assert lengths.tolist() == [6, 3, 6]
    assert tokens[1, 2] == EOS and torch.equal(tokens[1, :2], plain[1, :2]) and (tokens[1, 3:] == pad).all()
    assert torch.equal(tokens[0], plain[0]) and torch.equal(tokens[2], plain[2])


def test_sample_one_prefill_then_one_token_per_step(lm):
    """First forward sees the whole prefix width; every later one exactly 1 token per unfinished row with the KV cache
    (a row whose budget is spent leaves the batch)."""
    prompts = [[4, 5, 6], [7, 8], [9, 10, 11, 12, 13]]
    rec = Recorder(lm)
    torch.manual_seed(2)
    tokens, lengths = decoding.sample(rec, *_ids(prompts), _budget(4, 2, 4), _budget(4, 2, 4), top_k=5, eos_id=EOS)
    assert lengths.tolist() == [4, 2, 4]
    assert rec.calls[0]["shape"] == (3, 5) and rec.calls[0]["past"] is None
    assert len(rec.calls) == 4  # prefill + one call per token still needed (none after the last step)
    assert [call["shape"] for call in rec.calls[1:]] == [(3, 1), (2, 1), (2, 1)]
    assert all(call["past"] is not None for call in rec.calls[1:])


def test_sample_kv_cache_matches_full_recompute(lm):
    """Greedy tokens and every step's logits from the cached, padded loop equal a naive loop that re-runs the whole
    unpadded sequence each step."""
    prompt = [3, 14, 15, 9, 2, 6]
    rec = Recorder(lm)
    tokens, _ = decoding.sample(
        rec, *_ids([[1, 2], prompt, [7]]), _budget(6, 6, 2), _budget(6, 6, 2), greedy=True, eos_id=EOS
    )
    seq = list(prompt)
    with torch.no_grad():
        for step in range(6):
            logits = lm(input_ids=torch.tensor([seq])).logits[0, -1]
            torch.testing.assert_close(rec.calls[step]["logits"][1], logits, atol=1e-5, rtol=0)
            logits[EOS] = float("-inf")
            seq.append(int(logits.argmax()))
    assert tokens[1].tolist() == seq[len(prompt) :]


def _tiny_llama():
    """SmolLM2's architecture (Llama: rotary positions, grouped-query attention) at a tiny size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_static_cache_decoding_draws_the_same_tokens(lm, arch):
    """The fast path's loop (a static KV cache, finished rows kept in the batch; compile off on the CPU) draws token
    for token what `sample` draws from the same random numbers: left-padded prompts, a restart prefix of varying
    length, per-sample budgets (one 0), minimum lengths, EOS, top-k / nucleus sampling and greedy."""
    model = lm if arch == "gpt2" else _tiny_llama()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    query, query_mask, _, _ = _ids([torch.randint(2, vocab, (n,), generator=g).tolist() for n in (3, 7, 5, 6, 2, 7)])
    prefix, prefix_mask = decoding._left_pad(
        [torch.randint(2, vocab, (n,), generator=g) for n in (0, 2, 4, 1, 3, 0)], 0, "cpu"
    )
    max_new, min_new = _budget(12, 5, 12, 1, 0, 9), _budget(3, 0, 12, 1, 0, 0)
    early = 0
    for seed in range(6):
        for kwargs in (dict(top_k=5, top_p=0.9), dict(top_k=0, top_p=1.0), dict(greedy=True)):
            torch.manual_seed(seed)
            plain = decoding.sample(
                model, query, query_mask, prefix, prefix_mask, max_new, min_new, eos_id=EOS, pad_id=0, **kwargs
            )
            after_plain = torch.rand(1)
            torch.manual_seed(seed)
            static = decoding.sample_static(
                model, query, query_mask, prefix, prefix_mask, max_new, min_new, eos_id=EOS, pad_id=0, **kwargs
            )
            assert torch.equal(plain[0], static[0]) and torch.equal(plain[1], static[1]), (seed, kwargs)
            assert torch.equal(torch.rand(1), after_plain)  # the same random numbers consumed
            early += int((plain[1] < max_new).sum())
    assert early > 0  # some rows did end with EOS before their budget


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_compiled_static_decoding_traces_once_per_shape(lm, arch, monkeypatch):
    """The compiled step as the GPU runs it, traced by dynamo into ONE graph (fullgraph: no break would split the CUDA
    graph) and run eagerly on the CPU: it draws the same tokens as `sample`, and calls of other batch sizes and state
    widths reuse the graphs of their padded shapes. Without the padding and the kept caches, every call below with a
    new batch size or cache length would compile again."""
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: compile_(fn, backend=backend, fullgraph=True))
    torch._dynamo.reset()
    model = lm if arch == "gpt2" else _tiny_llama()
    model._compiled_decode_step = model._static_caches = None
    vocab, g = model.config.vocab_size, torch.Generator().manual_seed(1)
    counts = []
    for batch, prefix_len, budget in (
        (3, 0, 9),
        (6, 4, 7),
        (5, 2, 9),
        (12, 3, 8),
        (9, 0, 9),
        (16, 30, 40),
        (7, 1, 9),
        (14, 2, 5),
    ):
        query, query_mask, _, _ = _ids(
            [
                torch.randint(2, vocab, (int(n),), generator=g).tolist()
                for n in torch.randint(2, 8, (batch,), generator=g)
            ]
        )
        prefix, prefix_mask = decoding._left_pad(
            [
                torch.randint(2, vocab, (int(n),), generator=g)
                for n in torch.randint(0, prefix_len + 1, (batch,), generator=g)
            ],
            0,
            "cpu",
        )
        max_new, min_new = torch.randint(1, budget + 1, (batch,), generator=g), torch.zeros(batch, dtype=torch.long)
        torch.manual_seed(batch)
        plain = decoding.sample(
            model, query, query_mask, prefix, prefix_mask, max_new, min_new, top_k=5, eos_id=EOS, pad_id=0
        )
        torch.manual_seed(batch)
        fast = decoding.sample_static(
            model,
            query,
            query_mask,
            prefix,
            prefix_mask,
            max_new,
            min_new,
            top_k=5,
            eos_id=EOS,
            pad_id=0,
            compiled=True,
        )
        assert torch.equal(plain[0], fast[0]) and torch.equal(plain[1], fast[1]), batch
        counts.append(len(graphs))
        if batch == 3:
            first = model._static_caches[8, 64].layers[0].keys
    assert sorted(model._static_caches) == [
        (8, 64),
        (16, 64),
        (16, 128),
    ]  # batch -> power of two >= 8, length -> multiple of 64
    assert (
        model._static_caches[8, 64].layers[0].keys is first
    )  # one cache per shape, reset and reused: a CUDA graph replays over it
    assert (
        counts[0] == 1 and counts[1] == counts[2] == 1
    )  # the first shape compiles once, and calls of its shape reuse it
    assert (
        counts[-1] == counts[-3] <= 3
    )  # at most a static, then a dynamic graph (batch, then length); seen shapes reuse them


def test_compiled_static_decoding_traces_under_lora_and_keeps_few_caches(monkeypatch):
    """Under LoRA the KL reference and default guide are the policy's base with its adapters off (AdaptersOff): its
    compiled step traces as ONE graph too (the adapters are switched off around the whole loop, not inside the step),
    the policy (adapters on) and its reference draw exactly `sample`'s tokens, and the model keeps at most
    MAX_STATIC_CACHES caches (the least recently used shape's goes)."""
    import types

    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: compile_(fn, backend=backend, fullgraph=True))
    torch._dynamo.reset()
    args = types.SimpleNamespace(lora_r=4, lora_alpha=8.0, lora_dropout=0.0)
    policy = models.lora(_tiny_llama(), args)
    for name, p in policy.named_parameters():  # adapters away from zero: on and off differ
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    reference = models.AdaptersOff(policy)
    vocab, g = policy.config.vocab_size, torch.Generator().manual_seed(1)
    differ = 0
    for batch, budget in ((3, 9), (5, 9), (9, 9), (6, 70), (17, 9), (40, 9)):
        rows = [
            torch.randint(2, vocab, (int(n),), generator=g).tolist() for n in torch.randint(2, 8, (batch,), generator=g)
        ]
        query, query_mask, prefix, prefix_mask = _ids(rows)
        max_new, min_new = torch.full((batch,), budget), torch.zeros(batch, dtype=torch.long)
        out = {}
        for name, model in (("policy", policy), ("reference", reference)):
            torch.manual_seed(batch)
            plain = decoding.sample(
                model, query, query_mask, prefix, prefix_mask, max_new, min_new, top_k=5, eos_id=EOS
            )
            torch.manual_seed(batch)
            fast = decoding.sample_static(
                model, query, query_mask, prefix, prefix_mask, max_new, min_new, top_k=5, eos_id=EOS, compiled=True
            )
            assert torch.equal(plain[0], fast[0]) and torch.equal(plain[1], fast[1]), (name, batch)
            out[name] = plain[0]
        differ += not torch.equal(out["policy"], out["reference"])
    assert differ >= 4  # the adapters change what is drawn: both paths were exercised
    assert len(graphs) <= 6  # adapters on and off, static then dynamic shapes: no graph per call
    assert len(policy._static_caches) == decoding.MAX_STATIC_CACHES  # six shapes seen, four kept
    assert list(policy._static_caches)[-1] == (64, 64)  # the most recent shape stays


# ---------------------------------------------------------------------------------------------------------------
# generate_with_restarts, with deterministic fake samplers
# ---------------------------------------------------------------------------------------------------------------
PAD = 0
BASE = {POLICY: 100, GUIDE: 200}  # a sampler's t-th new token is BASE[who] + t: its origin and step are readable
ROW = 1000  # the first prompt token of row i is ROW + i, so a sampler can tell which sample it continues


class FakeSampler:
    """sampler signature: emits BASE + step for each new token; stops after stop_at[row] tokens (never before min_new
    nor after max_new, like the real sampler). Records every call."""

    def __init__(self, who, stop_at=None):
        self.base, self.stop_at, self.calls = BASE[who], stop_at, []

    def __call__(self, query, query_mask, prefix, prefix_mask, max_new, min_new):
        # recorded as the causal LM sees a state: prompt + response prefix, left-padded
        input_ids, attention_mask = decoding._left_pad(
            [torch.cat([q[qm], p[pm]]) for q, qm, p, pm in zip(query, query_mask, prefix, prefix_mask)], PAD, "cpu"
        )
        self.calls.append(
            dict(
                input_ids=input_ids.clone(),
                attention_mask=attention_mask.clone(),
                max_new=max_new.clone(),
                min_new=min_new.clone(),
            )
        )
        batch = input_ids.shape[0]
        width = int(max_new.max()) if batch else 0
        tokens = torch.full((batch, width), PAD, dtype=torch.long)
        lengths = torch.zeros(batch, dtype=torch.long)
        for b in range(batch):
            n = int(max_new[b])
            if self.stop_at is not None:
                row = int(input_ids[b][attention_mask[b]][0]) - ROW
                n = min(n, max(self.stop_at[row], int(min_new[b])))
            tokens[b, :n] = self.base + torch.arange(n)
            lengths[b] = n
        return tokens, lengths

    def rows(self, call):
        """Sample index of each row of a recorded call."""
        return [int(ids[m][0]) - ROW for ids, m in zip(call["input_ids"], call["attention_mask"])]


def _queries(batch, seed=0):
    """Left-padded prompts of lengths 1..4; prompt i starts with ROW + i, then tokens 1..9."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(batch):
        n = int(torch.randint(0, 4, (1,), generator=g))
        rows.append(torch.tensor([ROW + i] + torch.randint(1, 10, (n,), generator=g).tolist()))
    ids, mask = decoding._left_pad(rows, PAD, "cpu")
    return ids, mask, rows


def _tokens(pad_id, eos_id=None):
    """The two token ids generate_with_restarts reads of a tokenizer."""
    return types.SimpleNamespace(pad_token_id=pad_id, eos_token_id=eos_id)


def _run(rollin_by, rollout_by, n, min_new, seed=0, stop_at=None, query_seed=0):
    samplers = {POLICY: FakeSampler(POLICY, stop_at), GUIDE: FakeSampler(GUIDE, stop_at)}
    query, query_mask, rows = _queries(len(rollin_by), query_seed)
    out = common.generate_with_restarts(
        samplers,
        query,
        query_mask,
        torch.tensor(rollin_by),
        torch.tensor(rollout_by),
        n,
        min_new,
        torch.Generator().manual_seed(seed),
        _tokens(PAD),
    )
    return out, samplers, rows


def test_restarts_no_rollin_is_a_plain_rollout():
    """NO_ROLLIN: h = 0, the whole response is the rollout sampler's, by_guide marks guide rollouts, no rollin call."""
    rollout_by = [POLICY, GUIDE, GUIDE, POLICY]
    out, samplers, _ = _run([NO_ROLLIN] * 4, rollout_by, n=5, min_new=5)
    assert (out["restart_at"] == 0).all()
    for i, who in enumerate(rollout_by):
        assert out["response"][i].tolist() == [BASE[who] + t for t in range(5)]
        assert out["by_guide"][i].tolist() == [who == GUIDE] * 5
    assert out["response_mask"].all()
    for who in (POLICY, GUIDE):  # one call each: the rollout only
        assert len(samplers[who].calls) == 1


@pytest.mark.parametrize("n", [2, 6])
def test_restarts_rollin_prefix_then_rollout(n):
    """Fixed length: response[:h] = rollin's first h tokens, response[h:] = rollout's first N - h; by_guide is True
    exactly on guide tokens; response_mask covers all N tokens; 1 <= h <= N - 1."""
    combos = [(a, b) for a in (POLICY, GUIDE) for b in (POLICY, GUIDE)] * 6 + [(NO_ROLLIN, POLICY), (NO_ROLLIN, GUIDE)]
    rollin_by, rollout_by = zip(*combos)
    out, _, _ = _run(list(rollin_by), list(rollout_by), n=n, min_new=n, seed=5)
    for i, (a, b) in enumerate(combos):
        h = int(out["restart_at"][i])
        if a == NO_ROLLIN:
            assert h == 0
        else:
            assert 1 <= h <= n - 1
        expected = [BASE[a] + t for t in range(h)] + [BASE[b] + t for t in range(n - h)]
        assert out["response"][i].tolist() == expected
        assert out["by_guide"][i].tolist() == [a == GUIDE] * h + [b == GUIDE] * (n - h)
    assert out["response_mask"].all()


def test_restarts_rollout_prefix_is_prompt_plus_kept_rollin_tokens():
    """The rollout sampler receives, left-padded, the unpadded prompt followed by exactly the h kept rollin tokens."""
    combos = [(POLICY, GUIDE), (GUIDE, POLICY), (GUIDE, GUIDE), (POLICY, POLICY), (NO_ROLLIN, GUIDE)] * 4
    rollin_by, rollout_by = zip(*combos)
    n = 7
    out, samplers, rows = _run(list(rollin_by), list(rollout_by), n=n, min_new=n, seed=11)
    seen = set()
    for who in (POLICY, GUIDE):
        rollout_call = samplers[who].calls[-1]
        ids, mask = rollout_call["input_ids"], rollout_call["attention_mask"]
        for b, i in enumerate(samplers[who].rows(rollout_call)):
            assert combos[i][1] == who
            h = int(out["restart_at"][i])
            a = combos[i][0]
            expected = rows[i].tolist() + [BASE[a] + t for t in range(h)]
            real = int(mask[b].sum())
            assert mask[b].tolist() == [False] * (mask.shape[1] - real) + [True] * real  # left-padded
            assert ids[b][mask[b]].tolist() == expected
            assert (ids[b][~mask[b]] == PAD).all()
            assert int(rollout_call["max_new"][b]) == n - h
            seen.add(i)
    assert seen == set(range(len(combos)))


def test_restarts_h_uniform_fixed_length():
    """h ~ Uniform{1, ..., N-1} for rollin samples (4000 draws, N = 6); never 0 or N."""
    n, batch = 6, 4000
    out, _, _ = _run([POLICY, GUIDE] * (batch // 2), [GUIDE, POLICY] * (batch // 2), n=n, min_new=n, seed=123)
    counts = Counter(out["restart_at"].tolist())
    assert set(counts) == set(range(1, n))
    for h in range(1, n):
        assert abs(counts[h] - batch / (n - 1)) < 0.15 * batch / (n - 1), counts


def test_restarts_variable_length_h_within_rollin_length():
    """min < max: a rollin of length L gives h in {1, ..., L-1} (uniformly), L < 2 gives h = 0; the rollin is asked
    for N tokens with the task's min; the rollout gets budget N - h and min max(0, min - h)."""
    n, min_new = 6, 1
    lengths_by_kind = [1, 2, 3, 4, 6]
    batch = 1000
    stop_at = [lengths_by_kind[i % 5] for i in range(batch)]
    rollin_by = [POLICY if i % 2 else GUIDE for i in range(batch)]
    rollout_by = [GUIDE if i % 3 else POLICY for i in range(batch)]
    out, samplers, _ = _run(rollin_by, rollout_by, n=n, min_new=min_new, seed=7, stop_at=stop_at)
    h_by_L = {L: Counter() for L in lengths_by_kind}
    for i in range(batch):
        h_by_L[stop_at[i]][int(out["restart_at"][i])] += 1
    assert set(h_by_L[1]) == {0}
    for L in (2, 3, 4, 6):
        assert set(h_by_L[L]) == set(range(1, L)), (L, h_by_L[L])
        for h in range(1, L):  # 200 samples per L: each h within 40% of its expected count
            assert abs(h_by_L[L][h] - 200 / (L - 1)) < 0.4 * 200 / (L - 1), (L, h_by_L[L])
    for who in (POLICY, GUIDE):
        rollin, rollout = samplers[who].calls
        assert (rollin["max_new"] == n).all() and (rollin["min_new"] == min_new).all()
        for b, i in enumerate(samplers[who].rows(rollout)):
            h = int(out["restart_at"][i])
            assert int(rollout["max_new"][b]) == n - h
            assert int(rollout["min_new"][b]) == max(0, min_new - h)
    # An h = 0 sample restarts from the bare prompt: its whole response is the rollout's (which stops after 1 token).
    for i in (0, 5, 10, 15):
        assert stop_at[i] == 1 and out["restart_at"][i] == 0
        assert out["response"][i].tolist() == [BASE[rollout_by[i]]] + [PAD] * (n - 1)
        assert out["by_guide"][i].tolist() == [rollout_by[i] == GUIDE] + [False] * (n - 1)
        assert out["response_mask"][i].tolist() == [True] + [False] * (n - 1)


def test_restarts_variable_length_rollout_min_and_mask():
    """min = 3 < N = 6 and early-stopping samplers: rollout min is max(0, 3 - h), the response_mask covers exactly
    h + the rollout's length, pad after it."""
    n, min_new = 6, 3
    stop_at = [3, 4, 5, 6, 3, 4, 5, 6] * 8
    batch = len(stop_at)
    rollin_by = [GUIDE, POLICY] * (batch // 2)
    rollout_by = [POLICY] * (batch // 2) + [GUIDE] * (batch // 2)
    out, samplers, _ = _run(rollin_by, rollout_by, n=n, min_new=min_new, seed=3, stop_at=stop_at)
    for who in (POLICY, GUIDE):
        rollout = samplers[who].calls[1]
        for b, i in enumerate(samplers[who].rows(rollout)):
            h = int(out["restart_at"][i])
            assert 1 <= h <= stop_at[i] - 1
            assert int(rollout["min_new"][b]) == max(0, min_new - h)
            k = min(n - h, max(stop_at[i], min_new - h))  # what the fake rollout produced
            assert out["response_mask"][i].tolist() == [True] * (h + k) + [False] * (n - h - k)
            assert out["response"][i].tolist() == (
                [BASE[rollin_by[i]] + t for t in range(h)] + [BASE[who] + t for t in range(k)] + [PAD] * (n - h - k)
            )
            assert out["by_guide"][i].tolist() == [rollin_by[i] == GUIDE] * h + [who == GUIDE] * k + [False] * (
                n - h - k
            )


def test_restarts_fixed_length_rollin_stops_at_h():
    """min = max: the rollin sampler is asked for exactly h tokens (max_new = min_new = h), not the full N."""
    n = 8
    rollin_by = [POLICY, GUIDE, POLICY, GUIDE, NO_ROLLIN] * 6
    out, samplers, _ = _run(rollin_by, [POLICY] * len(rollin_by), n=n, min_new=n, seed=9)
    for who in (POLICY, GUIDE):
        rollin = samplers[who].calls[0]
        rows = samplers[who].rows(rollin)
        assert sorted(rows) == [i for i, a in enumerate(rollin_by) if a == who]
        h = out["restart_at"][rows]
        assert torch.equal(rollin["max_new"], h) and torch.equal(rollin["min_new"], h)
    assert len(set(out["restart_at"].tolist())) > 2  # h really varies across samples


def test_restarts_deterministic_given_generator_only():
    """Same rng seed gives the same result whatever the global torch/python seeds; the global RNG is not drawn from;
    another seed changes the restart points."""
    rollin_by = [POLICY, GUIDE, NO_ROLLIN] * 20
    rollout_by = [GUIDE, POLICY, POLICY] * 20
    for n, min_new, stop_at in ((6, 6, None), (6, 2, [6, 5, 4, 3, 2, 1] * 10)):
        torch.manual_seed(0), random.seed(0)
        state = torch.get_rng_state()
        first, _, _ = _run(rollin_by, rollout_by, n, min_new, seed=42, stop_at=stop_at)
        assert torch.equal(torch.get_rng_state(), state)
        torch.manual_seed(999), random.seed(999)
        second, _, _ = _run(rollin_by, rollout_by, n, min_new, seed=42, stop_at=stop_at)
        for key in first:
            assert torch.equal(first[key], second[key]), key
        other, _, _ = _run(rollin_by, rollout_by, n, min_new, seed=43, stop_at=stop_at)
        assert not torch.equal(first["restart_at"], other["restart_at"])


def test_restarts_with_real_sampler(lm, tiny):
    """End to end with the tiny GPT-2 as both samplers: shapes, masks, and rollin tokens kept verbatim."""
    tokenizer = models.load_tokenizer(tiny["lm"])
    samplers = {
        POLICY: decoding.sampler(lm, tokenizer, top_k=0, top_p=1.0, greedy=True),
        GUIDE: decoding.sampler(lm, tokenizer, top_k=0, top_p=1.0, greedy=True),
    }
    query, query_mask, no_prefix, no_prefix_mask = _ids([[4, 5, 6], [7, 8], [9, 10, 11, 12], [3]])
    n = 5
    plain = decoding.sample(
        lm,
        query,
        query_mask,
        no_prefix,
        no_prefix_mask,
        _budget(n, n, n, n),
        _budget(n, n, n, n),
        greedy=True,
        eos_id=EOS,
    )[0]
    out = common.generate_with_restarts(
        samplers,
        query,
        query_mask,
        torch.tensor([POLICY, GUIDE, NO_ROLLIN, GUIDE]),
        torch.tensor([GUIDE, POLICY, POLICY, GUIDE]),
        n,
        n,
        torch.Generator().manual_seed(0),
        _tokens(PAD),
    )
    # Greedy, same model for both roles: the restarted response equals an uninterrupted greedy response.
    assert torch.equal(out["response"], plain)
    assert out["response_mask"].all()
    assert out["by_guide"].tolist()[3] == [True] * n


@pytest.mark.parametrize("kind", ["lm", "t5"])
def test_sampler_logprobs_match_the_training_forward(tiny, monkeypatch, kind):
    """What each token was sampled from is what the training forward scores: for every token of every rollin and
    rollout (restarts prefill the prompt + kept prefix at once, then decode from the KV cache; prompts left-padded),
    the sampler's log-softmax equals forward's at that position within 1e-4. Decoder-only and encoder-decoder."""
    tokenizer = models.load_tokenizer(tiny[kind])
    policy, guide = (
        models.load_lm(tiny[kind], "cpu"),
        models.load_lm(tiny["lm2"] if kind == "lm" else tiny[kind], "cpu"),
    )
    step_logits, calls = [], []
    for model in (policy, guide):  # every model call inside `sample` is the prefill or one decoding step
        model.register_forward_hook(lambda module, args, out: step_logits.append(out.logits[:, -1].float().clone()))
    sample = decoding.sample

    def sample_spy(model, query, query_mask, prefix, prefix_mask, *args, **kwargs):
        step_logits.clear()
        tokens, lengths = sample(model, query, query_mask, prefix, prefix_mask, *args, **kwargs)
        calls.append((model, query, query_mask, prefix, prefix_mask, tokens, lengths, list(step_logits)))
        return tokens, lengths

    monkeypatch.setattr(decoding, "sample", sample_spy)
    samplers = {
        POLICY: decoding.sampler(policy, tokenizer, top_k=0, top_p=1.0),
        GUIDE: decoding.sampler(guide, tokenizer, top_k=0, top_p=1.0),
    }
    prompts = [
        "the film was",
        "a great and moving story of it",
        "dull",
        "this movie is a mess but the actors",
        "fun",
        "the plot",
        "it was",
        "a",
    ]
    query, query_mask = common.tokenize_prompts(tokenizer, prompts, 8, "left", "cpu")
    torch.manual_seed(0)
    out = common.generate_with_restarts(
        samplers,
        query,
        query_mask,
        torch.tensor([NO_ROLLIN, POLICY, GUIDE, POLICY, GUIDE, NO_ROLLIN, POLICY, GUIDE]),
        torch.tensor([POLICY, GUIDE, POLICY, POLICY, GUIDE, GUIDE, GUIDE, POLICY]),
        6,
        2,
        torch.Generator().manual_seed(0),
        tokenizer,
    )
    assert (out["restart_at"] > 0).sum() >= 4 and len(calls) == 4  # rollins by both, rollouts by both
    compared = 0
    for model, q, qm, prefix, prefix_mask, tokens, lengths, logits in calls:
        h = prefix_mask.sum(1)
        rows = [torch.cat([p[m], t[:n]]) for p, m, t, n in zip(prefix, prefix_mask, tokens, lengths.tolist())]
        width = max(len(r) for r in rows)
        response = torch.stack([torch.cat([r, r.new_full((width - len(r),), tokenizer.pad_token_id)]) for r in rows])
        response_mask = torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]
        with torch.no_grad():
            scored = common._logits(model, q, qm, response, response_mask)[0].log_softmax(-1)
        assert len(logits) >= int(lengths.max())
        for t in range(int(lengths.max())):  # step t: the rows still decoding, in order (the prefill holds all rows)
            active = (lengths > t).nonzero().squeeze(1)
            sampled = (logits[t][active] if t == 0 else logits[t]).log_softmax(-1)
            assert torch.allclose(sampled, scored[active, h[active] + t], atol=1e-4), (t, active)
            compared += len(active)
    assert (
        compared == sum(int(c[6].sum()) for c in calls) > int(out["response_mask"].sum())
    )  # every sampled token, the cut rollins' too


# ---------------------------------------------------------------------------------------------------------------
# Tokenization and decoding
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """A whitespace word-level tokenizer (w0..w19 get ids 2..21, '<eos>' = 0 = pad) loaded through
    models.load_tokenizer."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tokenizer_models
    from transformers import PreTrainedTokenizerFast

    words = ["<eos>", "[UNK]"] + [f"w{i}" for i in range(20)]
    tok = Tokenizer(tokenizer_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path_factory.mktemp("wordtok")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", unk_token="[UNK]", model_max_length=512
    ).save_pretrained(path)
    return models.load_tokenizer(str(path))


def test_load_tokenizer_left_pads_with_eos(word_tokenizer):
    assert word_tokenizer.padding_side == "left" and word_tokenizer.pad_token_id == 0


def test_tokenize_prompts_left_pads_and_truncates(word_tokenizer):
    """Prompts are left-padded (mask False on the left) and cut on the requested side to max_len tokens."""
    prompts = ["w1 w2 w3 w4 w5", "w6", "w7 w8"]
    ids, mask = common.tokenize_prompts(word_tokenizer, prompts, 3, "left", "cpu")
    assert mask.dtype == torch.bool
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert mask.tolist() == [[True] * 3, [False, False, True], [False, True, True]]
    ids, mask = common.tokenize_prompts(word_tokenizer, prompts, 3, "right", "cpu")
    assert ids.tolist() == [[3, 4, 5], [0, 0, 8], [0, 9, 10]]
    assert mask.tolist() == [[True] * 3, [False, False, True], [False, True, True]]
    ids, mask = common.tokenize_prompts(word_tokenizer, prompts, 10, "left", "cpu")
    assert ids.tolist()[0] == [3, 4, 5, 6, 7] and mask.tolist()[1] == [False] * 4 + [True]


def test_tokenize_responses_right_pads_and_decode_drops_padding(word_tokenizer):
    """Responses are right-padded and cut to max_len with a matching mask; decode_responses keeps only real tokens."""
    texts = [" w1 w2", " w3 w4 w5 w6 w7", ""]
    ids, mask = common.tokenize_responses(word_tokenizer, texts, 4, "cpu")
    assert ids.tolist() == [[3, 4, 0, 0], [5, 6, 7, 8], [0, 0, 0, 0]]
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [False] * 4]
    assert common.decode_responses(word_tokenizer, ids, mask) == ["w1 w2", "w3 w4 w5 w6", ""]
    # Padding is dropped by the mask, not by value: a non-pad id outside the mask is not decoded either.
    ids[0, 3] = 20
    assert common.decode_responses(word_tokenizer, ids, mask)[0] == "w1 w2"
    ids, mask = common.tokenize_responses(word_tokenizer, ["", ""], 4, "cpu")
    assert ids.shape == (2, 1) and not mask.any()


# ---------------------------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------------------------
def test_forward_matches_unpadded_per_sample(lm):
    """Batched left-padded prompts + right-padded responses give, at real response tokens, the log-probs and values
    of a plain unpadded forward pass of prompt + response, at the position before each token."""
    torch.manual_seed(5)
    head = torch.nn.Linear(lm.config.hidden_size, 3)
    prompts = [[4, 5, 6], [7, 8, 9, 10, 11], [12]]
    responses = [[13, 14, 15, 16], [17, 18], [19, 20, 21]]
    query, query_mask, _, _ = _ids(prompts)
    n = max(map(len, responses))
    response = torch.zeros(3, n, dtype=torch.long)
    response_mask = torch.zeros(3, n, dtype=torch.bool)
    for i, r in enumerate(responses):
        response[i, : len(r)] = torch.tensor(r)
        response_mask[i, : len(r)] = True
    with torch.no_grad():
        logprobs, values = common.forward(lm, head, query, query_mask, response, response_mask)
        assert logprobs.shape == (3, n) and values.shape == (3, n, 3)
        no_head, none = common.forward(lm, None, query, query_mask, response, response_mask)
        assert none is None
        torch.testing.assert_close(no_head, logprobs)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            out = lm(input_ids=torch.tensor([p + r]), output_hidden_states=True)
            positions = torch.arange(len(p) - 1, len(p) + len(r) - 1)
            expected = out.logits[0, positions].log_softmax(-1).gather(1, torch.tensor(r)[:, None]).squeeze(1)
            torch.testing.assert_close(logprobs[i, : len(r)], expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(
                values[i, : len(r)], head(out.hidden_states[-1][0, positions]), atol=1e-5, rtol=0
            )


def test_forward_without_gradients_goes_in_row_chunks(lm, monkeypatch):
    """Without gradients, forward splits the rows so that at most decoding.LOGITS_AT_ONCE logits exist at once, and
    gives what one pass over all rows gives; with gradients it is one pass."""
    torch.manual_seed(6)
    head = torch.nn.Linear(lm.config.hidden_size, 2)
    query, query_mask, _, _ = _ids([[4, 5, 6], [7, 8], [9, 10, 11, 12], [13], [14, 15], [16, 17, 18]])
    response = torch.randint(4, lm.config.vocab_size, (6, 3))
    response_mask = torch.ones(6, 3, dtype=torch.bool)
    response_mask[1, 2:] = False
    calls = []
    monkeypatch.setattr(
        lm, "forward", lambda *a, _f=lm.forward, **k: calls.append(k["input_ids"].shape[0]) or _f(*a, **k)
    )
    with torch.no_grad():
        whole = common.forward(lm, head, query, query_mask, response, response_mask)
        assert calls == [6]  # 6 rows x 3 tokens x the vocabulary fit under the limit
        monkeypatch.setattr(decoding, "LOGITS_AT_ONCE", 2 * 3 * lm.config.vocab_size)  # two rows at a time
        calls.clear()
        chunked = common.forward(lm, head, query, query_mask, response, response_mask)
        assert calls == [2, 2, 2]
    m = response_mask
    torch.testing.assert_close(whole[0][m], chunked[0][m], atol=1e-5, rtol=0)  # log-probs at the real tokens
    torch.testing.assert_close(whole[1][m], chunked[1][m], atol=1e-5, rtol=0)  # values
    calls.clear()
    common.forward(lm, head, query, query_mask, response, response_mask)[0].sum().backward()
    assert calls == [6]


def test_forward_logprobs_are_differentiable(lm):
    """Gradients flow to the model through forward (it is used for the PPO update)."""
    query, query_mask, _, _ = _ids([[4, 5], [6]])
    response = torch.tensor([[7, 8], [9, 0]])
    response_mask = torch.tensor([[True, True], [True, False]])
    logprobs, _ = common.forward(lm, None, query, query_mask, response, response_mask)
    assert logprobs.requires_grad and (logprobs <= 0).all()
    lm.zero_grad()
    common.masked_mean(logprobs, response_mask).backward()
    assert lm.transformer.wte.weight.grad.abs().sum() > 0
    lm.zero_grad()


# ---------------------------------------------------------------------------------------------------------------
# load_guide
# ---------------------------------------------------------------------------------------------------------------
def test_load_guide_picks_the_token_or_the_text_path(tiny, tmp_path):
    """A model with the policy's vocabulary (lm2) continues token ids and comes with its model; a black-box
    `module:function` comes alone; a model whose tokenizer numbers the words otherwise continues text (guides.py)."""
    from test_guides import other_tokenizer_lm

    tokenizer = models.load_tokenizer(tiny["lm"])
    guide, model = models.load_guide(_guide_args(tiny["lm2"]), tokenizer, {}, "cpu", torch.float32)
    assert model is not None and not hasattr(guide, "seam")
    guide, model = models.load_guide(_guide_args("conftest:constant_guide"), tokenizer, {}, "cpu", torch.float32)
    assert model is None and guide.__name__ == "constant_guide"
    guide, model = models.load_guide(
        _guide_args(other_tokenizer_lm(tiny, tmp_path / "other")), tokenizer, {}, "cpu", torch.float32
    )
    assert model is None and hasattr(guide, "seam")
    with pytest.raises(UserError, match="needs --guide-api-base"):
        models.load_guide(_guide_args("openai:some-model"), tokenizer, {}, "cpu", torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------
class Payload:
    """What a tampered training_state.pt could hold: unpickling it runs os.makedirs(marker)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_training_state_loads_without_unpickling_code(lm, tiny, tmp_path):
    """What save_checkpoint writes loads with torch.load(weights_only=True) and restores the optimizer, scheduler,
    random states and iteration; a --resume file that needs more (pickled code) is refused in one line, its code not
    run."""
    from plumbing import runs

    tokenizer = models.load_tokenizer(tiny["lm"])
    head = common.value_head(lm, 2, "cpu")
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, common.lr_lambda("linear", 10))
    head(torch.randn(3, lm.config.hidden_size)).sum().backward()
    optimizer.step(), scheduler.step()
    rng = torch.Generator().manual_seed(7)
    runs.save_checkpoint(str(tmp_path), lm, tokenizer, head, optimizer, scheduler, 3, rng)
    state_file = tmp_path / "checkpoint" / "training_state.pt"
    state = torch.load(state_file, weights_only=True)
    assert (
        state["iteration"] == 3
        and len(state["streams"]) == 1
        and torch.equal(state["streams"][0]["restart_rng"], rng.get_state())
    )

    head2 = common.value_head(lm, 2, "cpu")
    optimizer2 = torch.optim.AdamW(head2.parameters(), lr=1e-3)
    scheduler2 = torch.optim.lr_scheduler.LambdaLR(optimizer2, common.lr_lambda("linear", 10))
    rng2 = torch.Generator()
    assert runs.load_training_state(str(tmp_path), head2, optimizer2, scheduler2, rng2) == 3
    assert torch.equal(rng2.get_state(), rng.get_state()) and scheduler2.state_dict() == scheduler.state_dict()
    assert torch.equal(optimizer2.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])

    marker = tmp_path / "payload_ran"
    torch.save({**state, "extra": Payload(str(marker))}, state_file)
    with pytest.raises(UserError, match="more than tensors") as refused:
        runs.load_training_state(str(tmp_path), head2, optimizer2, scheduler2, rng2)
    assert "\n" not in str(refused.value) and not marker.exists()


def _guide_args(name):
    """The flags models.load_guide reads."""
    return types.SimpleNamespace(guide_name=name, top_k=0, guide_top_p=1.0, guide_api_base=None, fast_decoding=False)


def test_a_guide_that_stops_early_never_puts_eos_or_padding_in_the_restart_prefix():
    """Fixed length (min = max = 8): h is drawn before the rollin. A black-box guide that returns fewer tokens (here its
    token then its EOS, whatever the minimum) restarts where its own tokens end: the prefix holds its one real token,
    never the EOS nor padding; pi_theta writes the other 7; short_rollin marks the samples whose drawn h was beyond
    the guide's end, and restart_stats logs their share."""
    eos = 7

    def stopping_guide(query, query_mask, prefix, prefix_mask, max_new, min_new):
        tokens = torch.full((len(query), int(max_new.max())), PAD, dtype=torch.long)
        tokens[:, 0] = BASE[GUIDE]
        tokens[:, 1:2] = eos
        return tokens, max_new.clamp(max=2)

    n, batch = 8, 16
    samplers = {POLICY: FakeSampler(POLICY), GUIDE: stopping_guide}
    query, query_mask, _ = _queries(batch)
    rollin_by = torch.full((batch,), GUIDE)
    out = common.generate_with_restarts(
        samplers, query, query_mask, rollin_by, torch.full((batch,), POLICY), n, n, torch.Generator().manual_seed(3),
        _tokens(PAD, eos),
    )  # fmt: skip
    drawn = 1 + (torch.rand(batch, generator=torch.Generator().manual_seed(3)) * (n - 1)).long()
    assert (drawn >= 2).sum() >= 10  # most draws lie beyond the guide's one real token
    assert out["restart_at"].tolist() == [1] * batch and out["short_rollin"].tolist() == (drawn >= 2).tolist()
    assert (out["response"][:, 0] == BASE[GUIDE]).all() and (
        out["response"][:, 1:] == BASE[POLICY] + torch.arange(7)
    ).all()
    assert out["by_guide"].tolist() == [[True] + [False] * 7] * batch and out["response_mask"].all()
    assert common.restart_stats(out, rollin_by) == {
        "rlgf/restart_mean": 1.0,
        "rlgf/short_rollin_share": (drawn >= 2).float().mean().item(),
    }
