"""Unit tests of tasks/: the presets, the sentiment tasks (the Rotten Tomatoes splits, the imdb loader on local files,
the bag-of-words reward) and the concept-to-sentence tasks (CIDEr-D and BLEU-4 against numbers recorded from
pycocoevalcap, the fixed idf of the reward, the offline `concepts` data)."""

import importlib.util
import os
import random
import subprocess
import sys
from collections import Counter

import pytest
import torch

from conftest import ROOT
from plumbing import UserError, models
from tasks import commongen, sentiment, verdicts


# ---------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------
def test_task_names_are_the_presets():
    """--task's choices are exactly the tasks that have a preset. rotten-tomatoes' is empty: the scripts' own defaults
    are its values. Every key of a preset is a flag of some script, or a script's name holding that script's own values;
    TL;DR's Table 6 values reach the scripts that take them."""
    import typing

    import tasks
    from conftest import script

    assert (
        typing.get_args(tasks.Name)
        == tuple(tasks.TASKS)
        == ("rotten-tomatoes", "imdb", "commongen", "concepts", "tldr", "verdicts")
    )
    assert tasks.TASKS["rotten-tomatoes"] == {}
    names = ["ppo", "ppo_pp", "aggrevated", "lols", "d2lols", "grpo", "grpo_pp", "sft", "reward_model"]
    fields = {name: set(script(name).Args.__dataclass_fields__) for name in names}
    for preset in tasks.TASKS.values():
        for key, value in preset.items():
            if isinstance(value, dict):
                assert key in fields and set(value) <= fields[key], key
            else:
                assert any(key in f for f in fields.values()), key
    ppo_pp, aggrevated, d2lols = (
        tasks.defaults(script(name).Args, "tldr") for name in ("ppo_pp", "aggrevated", "d2lols")
    )
    assert (ppo_pp.gamma, ppo_pp.beta, ppo_pp.lora_r, ppo_pp.lora_alpha, aggrevated.beta) == (1.0, 0.6, 8, 64.0, 0.0)
    assert (d2lols.beta, d2lols.beta_ppo_pp, d2lols.beta_aggrevated, d2lols.alpha) == (None, 0.6, 0.0, 10)
    assert tasks.defaults(script("lols").Args, "tldr").beta is None  # --beta would set both kinds' shares
    assert tasks.defaults(script("grpo_pp").Args, "tldr").beta == 0.6
    assert (ppo_pp.prompt_len, ppo_pp.truncation_side, ppo_pp.max_new_tokens, ppo_pp.vf_coef, ppo_pp.kl_coef) == (
        500,
        "right",
        50,
        0.2,
        0.002,
    )
    assert tasks.defaults(script("reward_model").Args, "tldr").lora_r == 32


def test_eval_split_without_pairs_is_one_line(tiny):
    """CommonGen's published test split has no references: --eval-split test says so instead of evaluating nothing."""
    from types import SimpleNamespace

    import tasks

    args = SimpleNamespace(task="commongen", dataset_name=tiny["common_gen"], eval_split="test")
    with pytest.raises(UserError, match="--eval-split test: .* has no pairs there"):
        tasks.load_data(args, models.load_tokenizer(tiny["t5"]))
    data, _ = tasks.load_data(
        SimpleNamespace(**{**vars(args), "eval_split": "validation"}), models.load_tokenizer(tiny["t5"])
    )
    assert data["validation"] and not data["test"]


# ---------------------------------------------------------------------------------------------------------------
# Sentiment: the imdb loader
# ---------------------------------------------------------------------------------------------------------------
def test_imdb_path_on_local_copies(tiny):
    """Prompt = the first half of the review's words, its last prompt_len tokens; reference = the continuation."""
    tokenizer = models.load_tokenizer(tiny["lm"])
    data, labelled = sentiment.load_imdb(tiny["imdb"], tokenizer, prompt_len=5, max_new_tokens=4)
    assert len(data["train"]) == 64 and len(data["validation"]) == len(data["test"]) == 24
    originals = {text for text, _ in labelled["train"]}
    for prompt, reference in data["train"]:
        assert len(tokenizer(prompt, add_special_tokens=False).input_ids) == 5
        assert len(tokenizer(reference, add_special_tokens=False).input_ids) == 4
        matches = [o for o in originals if (prompt + reference).strip() in o]
        assert (
            len(matches) == 1
            and matches[0].index(reference.strip())
            == len(" ".join(matches[0].split()[: len(matches[0].split()) // 2])) + 1
        )
    assert sum(positive for _, positive in labelled["train"]) == 32


# ---------------------------------------------------------------------------------------------------------------
# Sentiment: BagOfWordsSentiment
# ---------------------------------------------------------------------------------------------------------------
GOOD = "great wonderful superb charming delightful".split()
BAD = "awful dull boring terrible tedious".split()
FILLER = "the a film movie story plot was and of it".split()


def _reviews(n, seed):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        positive = i % 2 == 0
        words = [rng.choice(FILLER) for _ in range(8)] + [rng.choice(GOOD if positive else BAD) for _ in range(2)]
        rng.shuffle(words)
        out.append((" ".join(words), positive))
    return out


def test_bag_of_words_is_the_same_in_every_process(tmp_path):
    """Trained and scored in two processes with different string hash seeds (so sets of words iterate in different
    orders), the reward is the same to the last bit: one seed fixes a run, across processes too."""
    code = (
        f"import sys; sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.dirname(__file__)!r}); "
        "import test_tasks; from plumbing import models; from tasks import sentiment; models.CACHE_DIR = sys.argv[1]; "
        "labelled = {'train': test_tasks._reviews(120, 0), 'validation': test_tasks._reviews(40, 1)}; "
        "model = sentiment.BagOfWordsSentiment(labelled); "
        "print(model.score([t for t, _ in labelled['validation']]).tolist(), model.weight.sum().item())"
    )
    outputs = []
    for seed in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / seed)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
            check=True,
        )
        outputs.append(done.stdout.strip().splitlines()[-1])
    assert outputs[0] == outputs[1]


def test_bag_of_words_learns_and_caches(tmp_path, monkeypatch):
    """Positive texts score above negative ones, validation has accuracy/auc, and a second construction loads the
    cache file (no training) with identical outputs."""
    monkeypatch.setattr(models, "CACHE_DIR", str(tmp_path / "cache"))
    labelled = {"train": _reviews(120, 0), "validation": _reviews(40, 1)}
    model = sentiment.BagOfWordsSentiment(labelled)
    assert set(model.validation) >= {"accuracy", "auc"}
    assert model.validation["accuracy"] >= 0.9 and model.validation["auc"] >= 0.95
    files = os.listdir(tmp_path / "cache")
    assert len(files) == 1 and files[0].startswith("bow_logreg_")

    texts = [t for t, _ in labelled["validation"]]
    labels = torch.tensor([y for _, y in labelled["validation"]])
    scores = model.score(texts)
    assert scores.shape == (len(texts),) and ((scores > 0) & (scores < 1)).all()
    assert scores[labels].min() > scores[~labels].max()
    assert model(["a great"], [" wonderful film"])[0] > 0.5 > model(["an awful"], [" boring film"])[0]

    def no_training(*args, **kwargs):
        raise AssertionError("the second construction must load the cache, not train")

    monkeypatch.setattr(sentiment.BagOfWordsSentiment, "_train", staticmethod(no_training))
    again = sentiment.BagOfWordsSentiment(labelled)
    assert torch.equal(again.score(texts), scores)
    assert again.validation == model.validation


# ---------------------------------------------------------------------------------------------------------------
# Sentiment: the Rotten Tomatoes splits
# ---------------------------------------------------------------------------------------------------------------
def test_movie_split_deterministic_and_roughly_80_10_10():
    """_movie_split is a pure function of the name and splits ~80/10/10 over many names."""
    names = [f"movie_{i}" for i in range(5000)]
    splits = [sentiment.movie_split(n) for n in names]
    assert splits == [sentiment.movie_split(n) for n in names]
    counts = Counter(splits)
    assert set(counts) == {"train", "validation", "test"}
    assert abs(counts["train"] / 5000 - 0.8) < 0.03
    assert abs(counts["validation"] / 5000 - 0.1) < 0.02 and abs(counts["test"] / 5000 - 0.1) < 0.02


def test_load_rotten_tomatoes_splits():
    """Splits are non-empty; prompt + reference is the snippet's words (prompt = first half); every pair comes from a
    film of its own split and no film's snippets land in two splits; labelled mirrors the pairs with fresh = True."""
    data, labelled = sentiment.load_rotten_tomatoes()
    rows = sentiment.rotten_tomatoes_rows()
    movies_of_text, label_of_text = {}, {}
    for r in rows:
        text = " ".join(r["text"].split())
        movies_of_text.setdefault(text, set()).add(r["movie_name"])
        label_of_text.setdefault(text, set()).add(r["category"] == "fresh")

    films = {}
    for split in ("train", "validation", "test"):
        assert len(data[split]) > 0 and len(data[split]) == len(labelled[split])
        films[split] = set()
        for (prompt, reference), (text, label) in zip(data[split], labelled[split]):
            assert reference.startswith(" ") and not prompt.startswith(" ")
            assert prompt + reference == text
            words = text.split()
            assert len(words) >= 8 and prompt.split() == words[: len(words) // 2]
            assert text in movies_of_text, "prompt + reference must be an original snippet"
            assert label in label_of_text[text]
            own = {m for m in movies_of_text[text] if sentiment.movie_split(m) == split}
            assert own, "a pair must come from a film of its own split"
            films[split] |= own
    assert not films["train"] & films["validation"]
    assert not films["train"] & films["test"]
    assert not films["validation"] & films["test"]

    expected = Counter(sentiment.movie_split(r["movie_name"]) for r in rows if len(r["text"].split()) >= 8)
    assert {s: len(data[s]) for s in data} == dict(expected)
    assert len(data["train"]) > 5 * len(data["validation"])


# ---------------------------------------------------------------------------------------------------------------
# CommonGen: CIDEr-D, BLEU-4, the reward, the concepts data
# ---------------------------------------------------------------------------------------------------------------
# Five items with several references each; the expected numbers were recorded from pycocoevalcap 1.2
# (Cider().compute_score and Bleu(4).compute_score on these exact strings).
REFS = [
    ["a man is riding a horse on the beach", "a person rides a brown horse along the shore"],
    ["the dog catches a frisbee in the park", "a dog jumps to catch the frisbee", "dog playing frisbee in a park"],
    ["two children are playing soccer on a field", "kids play football in the grass"],
    ["a woman cuts vegetables in the kitchen", "the chef is chopping vegetables on a board"],
    ["a cat sleeps on the sofa", "the cat is sleeping on a couch near the window"],
]
HYPS = [
    "a man rides a horse on the beach",
    "a dog catches the frisbee in a park",
    "children play soccer on the grass field",
    "a woman is chopping vegetables in a kitchen",
    "a cat is sleeping on the couch",
]
PYCOCO_CIDER = [3.394074835824426, 3.282328657891393, 1.742282167790066, 2.5555563233918037, 2.6719241018008786]
PYCOCO_BLEU4 = 0.42559765639438213


def test_cider_d_matches_pycocoevalcap():
    cider = commongen.CiderD(REFS)
    for hyp, refs, expected in zip(HYPS, REFS, PYCOCO_CIDER):
        assert cider.score(hyp, refs) == pytest.approx(expected, abs=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("pycocoevalcap") is None, reason="pycocoevalcap not installed")
def test_cider_d_matches_pycocoevalcap_live():
    """Where pycocoevalcap is installed: random item sets, compared live."""
    from pycocoevalcap.cider.cider import Cider

    g = torch.Generator().manual_seed(0)
    words = "a the man dog cat runs sits on in park beach red big small frisbee catches".split()

    def sentence():
        return " ".join(
            words[i] for i in torch.randint(len(words), (int(torch.randint(3, 10, (1,), generator=g)),), generator=g)
        )

    refs = {i: [sentence() for _ in range(1 + i % 3)] for i in range(12)}
    hyps = {i: [sentence()] for i in range(12)}
    _, expected = Cider().compute_score(refs, hyps)
    mine = commongen.CiderD([refs[i] for i in range(12)])
    for i in range(12):
        assert mine.score(hyps[i][0], refs[i]) == pytest.approx(float(expected[i]), abs=1e-6)


def test_bleu4_matches_coco_bleu():
    assert commongen.bleu4(HYPS, REFS) == pytest.approx(100 * PYCOCO_BLEU4, abs=1e-6)


def test_coco_tokenize():
    assert (
        commongen.coco_tokenize("A man's dog doesn't run, quickly... (really)!")
        == "a man 's dog does n't run quickly really"
    )


def test_reward_idf_is_fixed_across_batches():
    """The reward's CIDEr-D uses the train references' idf: an item scores the same alone, in any batch, in any order
    (per-batch idf would give 0.0 alone and change with the batch)."""
    prompts = [f"p{i}" for i in range(5)]
    reward = commongen.ConceptsReward(
        {"references": dict(zip(prompts, REFS)), "concepts": {p: 3 for p in prompts}}, prompts
    )
    together = reward(prompts, HYPS)
    assert torch.allclose(together, torch.tensor(PYCOCO_CIDER, dtype=together.dtype), atol=1e-5)  # train = these 5
    for i in range(5):
        assert reward([prompts[i]], [HYPS[i]]).item() == pytest.approx(together[i].item(), abs=1e-9)
    assert torch.equal(reward(prompts[::-1], HYPS[::-1]), together.flip(0))
    assert commongen.CiderD([REFS[0]]).score(HYPS[0], REFS[0]) == 0.0  # what a per-item idf would give


def test_metrics_split_easy_and_hard():
    prompts = [f"p{i}" for i in range(5)]
    reward = commongen.ConceptsReward(
        {"references": dict(zip(prompts, REFS)), "concepts": dict(zip(prompts, [3, 3, 4, 5, 3]))}, prompts
    )
    metrics = reward.metrics(prompts, HYPS)
    assert metrics["cider"] == pytest.approx(sum(PYCOCO_CIDER) / 5, abs=1e-6)
    easy = [PYCOCO_CIDER[i] for i in (0, 1, 4)]
    assert metrics["cider_easy"] == pytest.approx(sum(easy) / 3, abs=1e-6)
    assert metrics["cider_hard"] == pytest.approx((PYCOCO_CIDER[2] + PYCOCO_CIDER[3]) / 2, abs=1e-6)
    assert metrics["bleu4"] == pytest.approx(100 * PYCOCO_BLEU4, abs=1e-6)
    assert "spice" not in metrics  # no SPICE jars here


def test_concepts_task_data():
    """Offline stand-in: every concept appears in its reference snippet; 3-5 concepts; no film in two splits."""

    class Tokenizer:
        eos_token = "<eos>"

    data, reward_data = commongen.load_concepts(Tokenizer())
    assert all(len(data[s]) > 500 for s in ("train", "validation", "test"))
    for prompt, reference in data["train"][:300]:
        concepts = prompt.split(": ", 1)[1].split(".\n")[0].split(", ")
        assert 3 <= len(concepts) == reward_data["concepts"][prompt] <= 5
        assert all(c in reference.lower() for c in concepts)
        assert reference.endswith("<eos>") and reward_data["references"][prompt] == [reference[1 : -len("<eos>")]]


# ---------------------------------------------------------------------------------------------------------------
# verdicts: the designed task (docs/predictions.md)
# ---------------------------------------------------------------------------------------------------------------
def test_verdicts_data_keeps_the_critics_labels_and_the_film_split():
    """Every prompt shows two snippets whose labels are the critics' own, the reference answers them in the asked
    form, no film is in two splits, and the train split pairs every snippet twice."""

    class Tokenizer:
        eos_token = "<eos>"

    data, reward_data = verdicts.load_verdicts(Tokenizer())
    rows = sentiment.rotten_tomatoes_rows()
    seen_as = {}  # a snippet's text -> its (split, label) pairs (a few texts are quoted for more than one film)
    for r in rows:
        seen_as.setdefault(" ".join(r["text"].split()), set()).add(
            (sentiment.movie_split(r["movie_name"]), r["category"])
        )
    assert len(data["validation"]) > 200 and len(data["test"]) > 200 and len(data["train"]) > 3000
    for split, pairs in data.items():
        for prompt, reference in pairs:
            snippets = [line.split(". ", 1)[1] for line in prompt.split("<|im_end|>")[0].split("\n")[2:]]
            labels = reward_data["labels"][prompt]
            assert len(snippets) == 2 and all((split, y) in seen_as[s] for s, y in zip(snippets, labels))
            assert reference == verdicts.answer(reward_data["labels"][prompt]) + "<eos>"
            assert prompt.endswith("<|im_start|>assistant\n")
    shown = Counter(
        line.split(". ", 1)[1] for p, _ in data["train"] for line in p.split("<|im_end|>")[0].split("\n")[2:]
    )
    rows_of = Counter(" ".join(r["text"].split()) for r in rows if sentiment.movie_split(r["movie_name"]) == "train")
    assert all(n <= 2 * rows_of[text] for text, n in shown.items())  # each snippet row at most twice
    assert sum(shown.values()) > 1.9 * sum(n for text, n in rows_of.items() if len(text.split()) <= verdicts.MAX_WORDS)


def test_verdicts_reward_is_all_or_nothing_on_form_and_labels():
    prompt = "p"
    reward = verdicts.VerdictsReward({"labels": {prompt: ["fresh", "rotten"]}})
    answers = {
        "1. fresh\n2. rotten": 1.0,
        " 1. Fresh.\n2. ROTTEN\n": 1.0,  # case, a trailing period, surrounding space
        "fresh\nrotten": 1.0,  # the numbers may go
        "1. fresh\n\n2. rotten": 1.0,  # blank lines are not lines
        "1. rotten\n2. rotten": 0.0,  # one verdict wrong
        "1. fresh": 0.0,  # one verdict missing
        "1. fresh, 2. rotten": 0.0,  # not one per line
        "1. fresh review\n2. rotten": 0.0,  # more than the word
        "1. fresh\n2. rotten\n3. fresh": 1.0,  # lines after the asked two are not read
        "": 0.0,
    }
    prompts, generations = [prompt] * len(answers), list(answers)
    assert reward(prompts, generations).tolist() == list(answers.values())
    metrics = reward.metrics(prompts, generations)
    assert metrics["format"] == pytest.approx(6 / 10)  # all but the missing, comma and "review" answers, and ""
    assert metrics["accuracy"] == pytest.approx((5 * 1.0 + 0.5) / 10)  # a malformed answer counts 0
