"""CommonGen: encoder-decoder policies through the same helpers and scripts, CIDEr-D and BLEU-4 against numbers
recorded from pycocoevalcap, the fixed idf of the reward, and the offline `concepts` task."""

import importlib.util
import os

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

import common
from common import GUIDE, NO_ROLLIN, POLICY
from conftest import run

# Five items with several references each; the expected numbers were recorded from pycocoevalcap 1.2
# (Cider().compute_score and Bleu(4).compute_score on these exact strings).
REFS = [
    ["a man is riding a horse on the beach", "a person rides a brown horse along the shore"],
    ["the dog catches a frisbee in the park", "a dog jumps to catch the frisbee", "dog playing frisbee in a park"],
    ["two children are playing soccer on a field", "kids play football in the grass"],
    ["a woman cuts vegetables in the kitchen", "the chef is chopping vegetables on a board"],
    ["a cat sleeps on the sofa", "the cat is sleeping on a couch near the window"],
]
HYPS = ["a man rides a horse on the beach", "a dog catches the frisbee in a park", "children play soccer on the grass field",
        "a woman is chopping vegetables in a kitchen", "a cat is sleeping on the couch"]
PYCOCO_CIDER = [3.394074835824426, 3.282328657891393, 1.742282167790066, 2.5555563233918037, 2.6719241018008786]
PYCOCO_BLEU4 = 0.42559765639438213


def test_cider_d_matches_pycocoevalcap():
    cider = common.CiderD(REFS)
    for hyp, refs, expected in zip(HYPS, REFS, PYCOCO_CIDER):
        assert cider.score(hyp, refs) == pytest.approx(expected, abs=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("pycocoevalcap") is None, reason="pycocoevalcap not installed")
def test_cider_d_matches_pycocoevalcap_live():
    """Where pycocoevalcap is installed: random item sets, compared live."""
    from pycocoevalcap.cider.cider import Cider

    g = torch.Generator().manual_seed(0)
    words = "a the man dog cat runs sits on in park beach red big small frisbee catches".split()

    def sentence():
        return " ".join(words[i] for i in torch.randint(len(words), (int(torch.randint(3, 10, (1,), generator=g)),), generator=g))

    refs = {i: [sentence() for _ in range(1 + i % 3)] for i in range(12)}
    hyps = {i: [sentence()] for i in range(12)}
    _, expected = Cider().compute_score(refs, hyps)
    mine = common.CiderD([refs[i] for i in range(12)])
    for i in range(12):
        assert mine.score(hyps[i][0], refs[i]) == pytest.approx(float(expected[i]), abs=1e-6)


def test_bleu4_matches_coco_bleu():
    assert common.bleu4(HYPS, REFS) == pytest.approx(100 * PYCOCO_BLEU4, abs=1e-6)


def test_coco_tokenize():
    assert common.coco_tokenize("A man's dog doesn't run, quickly... (really)!") == "a man 's dog does n't run quickly really"


def test_reward_idf_is_fixed_across_batches():
    """The reward's CIDEr-D uses the train references' idf: an item scores the same alone, in any batch, in any order
    (per-batch idf would give 0.0 alone and change with the batch)."""
    prompts = [f"p{i}" for i in range(5)]
    reward = common.ConceptsReward({"references": dict(zip(prompts, REFS)), "concepts": {p: 3 for p in prompts}}, prompts)
    together = reward(prompts, HYPS)
    assert torch.allclose(together, torch.tensor(PYCOCO_CIDER, dtype=together.dtype), atol=1e-5)  # train = these 5
    for i in range(5):
        assert reward([prompts[i]], [HYPS[i]]).item() == pytest.approx(together[i].item(), abs=1e-9)
    assert torch.equal(reward(prompts[::-1], HYPS[::-1]), together.flip(0))
    assert common.CiderD([REFS[0]]).score(HYPS[0], REFS[0]) == 0.0  # what a per-item idf would give


def test_metrics_split_easy_and_hard():
    prompts = [f"p{i}" for i in range(5)]
    reward = common.ConceptsReward({"references": dict(zip(prompts, REFS)), "concepts": dict(zip(prompts, [3, 3, 4, 5, 3]))}, prompts)
    metrics = reward.metrics(prompts, HYPS)
    assert metrics["cider"] == pytest.approx(sum(PYCOCO_CIDER) / 5, abs=1e-6)
    easy = [PYCOCO_CIDER[i] for i in (0, 1, 4)]
    assert metrics["cider_easy"] == pytest.approx(sum(easy) / 3, abs=1e-6)
    assert metrics["cider_hard"] == pytest.approx((PYCOCO_CIDER[2] + PYCOCO_CIDER[3]) / 2, abs=1e-6)
    assert metrics["bleu4"] == pytest.approx(100 * PYCOCO_BLEU4, abs=1e-6)
    assert "spice" not in metrics  # no SPICE jars here


@pytest.fixture(scope="module")
def t5(tiny):
    return common.load_lm(tiny["t5"], "cpu"), common.load_tokenizer(tiny["t5"])


def test_t5_forward_matches_unpadded(t5):
    """Log-probs of decoder tokens from a padded batch equal per-sample unpadded forward passes."""
    model, _ = t5
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11, 12], [13, 14]]
    query, query_mask = common._left_pad([torch.tensor(p) for p in prompts], 0, "cpu")
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
    samplers = {who: common.sampler(model, tokenizer, 0, 1.0, greedy=True) for who in (POLICY, GUIDE)}
    query, query_mask = common._left_pad([torch.tensor(p) for p in ([4, 5, 6], [7, 8], [9, 10, 11, 12])], 0, "cpu")
    n, budget = 6, torch.full((3,), 6)
    plain, _ = common.sample(model, query, query_mask, query[:, :0], query_mask[:, :0], budget, budget, greedy=True, eos_id=0)
    out = common.generate_with_restarts(samplers, query, query_mask, torch.tensor([POLICY, GUIDE, NO_ROLLIN]),
                                        torch.tensor([GUIDE, POLICY, POLICY]), n, n, torch.Generator().manual_seed(0), 0)
    assert torch.equal(out["response"], plain)
    h = out["restart_at"]
    assert (h[:2] >= 1).all() and h[2] == 0
    assert out["by_guide"][0].tolist() == [t >= h[0] for t in range(n)] and out["by_guide"][1].tolist() == [t < h[1] for t in range(n)]


def test_t5_beam_search_evaluation(t5):
    model, tokenizer = t5
    query, query_mask = common._left_pad([torch.tensor(p) for p in ([4, 5, 6], [7, 8])], 0, "cpu")
    beams = common.sampler(model, tokenizer, 0, 1.0, num_beams=5)
    tokens, lengths = beams(query, query_mask, query[:, :0], query_mask[:, :0], torch.full((2,), 6), torch.full((2,), 2))
    assert ((lengths >= 2) & (lengths <= 6)).all()
    expected = model.generate(input_ids=query, attention_mask=query_mask.long(), num_beams=5, max_new_tokens=6, min_new_tokens=2)
    for i in range(2):
        assert tokens[i, : lengths[i]].tolist() == expected[i, 1 : 1 + lengths[i]].tolist()


def commongen_flags(tiny):
    return dict(task="commongen", dataset_name=tiny["common_gen"], model_name=tiny["t5"], eval_lm_name=tiny["t5"],
                reward_model_name="cider-d", prompt_len=12, max_new_tokens=6, min_new_tokens=2)


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
    _, metrics = run("sft", tiny, tmp_path, num_epochs=2.0, batch_size=8, sft_learning_rate=1e-2, **commongen_flags(tiny))
    assert metrics[-1]["eval/perplexity"] < metrics[0]["eval/perplexity"]


def test_concepts_task_data():
    """Offline stand-in: every concept appears in its reference snippet; 3-5 concepts; no film in two splits."""

    class Tokenizer:
        eos_token = "<eos>"

    data, reward_data = common.load_concepts(Tokenizer())
    assert all(len(data[s]) > 500 for s in ("train", "validation", "test"))
    for prompt, reference in data["train"][:300]:
        concepts = prompt.split(": ", 1)[1].split(".\n")[0].split(", ")
        assert 3 <= len(concepts) == reward_data["concepts"][prompt] <= 5
        assert all(c in reference.lower() for c in concepts)
        assert reference.endswith("<eos>") and reward_data["references"][prompt] == [reference[1 : -len("<eos>")]]
