"""TL;DR (issue: a learned reward model, LoRA policies, ROUGE, a judged win rate and Best-of-N) on tiny local files in
the datasets' formats, with tiny models built in the test."""

import json
import math
import os
import types

import pytest
import torch
from safetensors.torch import load_file

from conftest import NEGATIVE, POSITIVE, args_for, run, script
from plumbing import models
from tasks import learned_reward
from test_cli import cli


def train_reward_model(tiny, tmp_path, **overrides):
    """reward_model.py on the tiny comparisons; returns (checkpoint directory, metrics rows)."""
    module = script("reward_model")
    values = dict(
        task="tldr",
        dataset_name=tiny["comparisons"],
        model_name=tiny["lm"],
        output_dir=str(tmp_path),
        device="cpu",
        lora_r=0,
        learning_rate=3e-3,
        batch_size=8,
        num_epochs=3.0,
        max_length=48,
        eval_size=32,
    )
    values.update(overrides)
    module.main(args_for(module, values.pop("task"), **values))
    (run_dir,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path) if d.startswith("tldr__reward_model")]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return os.path.join(run_dir, "checkpoint"), [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reward_dir(tiny, tmp_path_factory):
    return train_reward_model(tiny, tmp_path_factory.mktemp("rm"))


def test_bradley_terry_loss_and_pair_accuracy():
    import reward_model

    loss, accuracy = reward_model.bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-2)) + math.log(2)) / 2)
    assert accuracy.item() == 0.5
    chosen = torch.tensor([0.5], requires_grad=True)
    reward_model.bradley_terry_loss(chosen, torch.tensor([0.0]))[0].backward()
    assert chosen.grad.item() < 0  # raising the chosen reward lowers the loss


def test_the_reward_reads_the_last_real_token_whatever_the_padding(tiny):

    assert learned_reward.last_real_index(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]])).tolist() == [
        3,
        2,
        0,
    ]
    torch.manual_seed(0)
    model = learned_reward.RewardModel(learned_reward.load_trunk(tiny["lm"])).eval()
    tokenizer = models.load_tokenizer(tiny["lm"])
    texts = ["great fun", "the film was dull and the plot a mess", "superb", "boring tedious film with the actors"]
    scores = {}
    for side in ("left", "right"):
        tokenizer.padding_side = side
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        scores[side] = model(enc.input_ids, enc.attention_mask)
    alone = torch.cat(
        [
            model(**{k: v for k, v in tokenizer([t], return_tensors="pt").items() if k != "token_type_ids"})
            for t in texts
        ]
    )
    torch.testing.assert_close(scores["left"], scores["right"], atol=1e-5, rtol=0)
    torch.testing.assert_close(scores["left"], alone, atol=1e-5, rtol=0)
    assert scores["left"].std() > 0  # not a constant


def test_the_trunk_keeps_tied_embeddings_saved_as_the_lm_head(tiny, tmp_path):
    """A causal LM whose tied embeddings are stored once, as lm_head.weight (our cache of smollm2-135m is such a
    checkpoint): the reward model's trunk gets the LM's embeddings, not random ones."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=0,
    )
    models.save_checkpoint_model(LlamaForCausalLM(config), models.load_tokenizer(tiny["lm"]), str(tmp_path / "tied"))
    lm = models.load_lm(str(tmp_path / "tied"), "cpu")
    torch.manual_seed(1)
    trunk = learned_reward.load_trunk(str(tmp_path / "tied"))
    assert torch.equal(trunk.embed_tokens.weight, lm.model.embed_tokens.weight)


def test_the_reward_model_trains_and_its_checkpoint_scores_as_trained(tiny, tmp_path, reward_dir):

    checkpoint, rows = reward_dir
    before, after = rows[0]["eval/accuracy"], rows[-1]["eval/accuracy"]
    assert before < 0.8 and after >= 0.9, (before, after)
    assert rows[1]["loss/bradley_terry"] > rows[-2]["loss/bradley_terry"]
    info = json.load(open(os.path.join(checkpoint, "reward_model.json")))
    assert info["accuracy_after"] == round(after, 4) and info["base"] == tiny["lm"]
    reward = learned_reward.LearnedReward(checkpoint, torch.device("cpu"))
    pairs = [json.loads(line) for line in open(os.path.join(tiny["comparisons"], "test.jsonl"))]
    chosen = reward([p["prompt"] + "\n" for p in pairs], [p["chosen"] for p in pairs])
    rejected = reward([p["prompt"] + "\n" for p in pairs], [p["rejected"] for p in pairs])
    assert (chosen > rejected).float().mean().item() == pytest.approx(after)
    assert torch.cat([chosen, rejected]).mean().item() == pytest.approx(info["reward_mean"], abs=1e-4)


def test_a_lora_reward_model_saves_its_adapter_and_loads_merged(tiny, tmp_path):

    checkpoint, rows = train_reward_model(tiny, tmp_path, lora_r=4, lora_alpha=8.0, learning_rate=1e-2)
    assert os.path.isfile(os.path.join(checkpoint, "adapter_config.json")) and not os.path.isfile(
        os.path.join(checkpoint, "model.safetensors")
    )
    assert rows[-1]["eval/accuracy"] > rows[0]["eval/accuracy"]
    reward = learned_reward.LearnedReward(checkpoint, torch.device("cpu"))
    pairs = [json.loads(line) for line in open(os.path.join(tiny["comparisons"], "test.jsonl"))]
    chosen = reward([p["prompt"] + "\n" for p in pairs], [p["chosen"] for p in pairs])
    rejected = reward([p["prompt"] + "\n" for p in pairs], [p["rejected"] for p in pairs])
    assert (chosen > rejected).float().mean().item() == pytest.approx(rows[-1]["eval/accuracy"])


@pytest.mark.parametrize("name", ["ppo", "ppo_pp", "aggrevated", "lols", "d2lols"])
def test_tldr_runs_every_algorithm_with_the_presets_lora(tiny, tmp_path, reward_dir, name, monkeypatch):
    """--task tldr end to end on local files: the preset's LoRA (r 8), gamma 1.0, the learned reward, ROUGE."""

    seen, lora = {}, models.lora

    def lora_spy(model, args):
        seen["lora"] = (args.lora_r, args.lora_alpha, args.gamma, args.kl_coef, args.vf_coef)
        return lora(model, args)

    monkeypatch.setattr(models, "lora", lora_spy)
    run_dir, rows = run(
        name,
        tiny,
        tmp_path,
        task="tldr",
        dataset_name=tiny["tldr"],
        reward_model_name=reward_dir[0],
        num_iterations=1,
        min_new_tokens=0,
        prompt_len=24,
        eval_size=6,
        **({"alpha": 1} if name == "d2lols" else {}),
    )
    assert seen["lora"] == (8, 64.0, 1.0, 0.002, 0.2)
    assert os.path.isfile(os.path.join(run_dir, "checkpoint", "adapter_model.safetensors"))
    critic = os.path.join(run_dir, "checkpoint", "critic", "adapter_model.safetensors")  # Table 6's separate critic
    assert os.path.isfile(critic) and any(v.abs().sum() > 0 for k, v in load_file(critic).items() if "lora_B" in k)
    for key in (
        "eval/reward",
        "eval/rouge1",
        "eval/rouge2",
        "eval/rougeL",
        "eval/perplexity",
        "eval/output_perplexity",
    ):
        assert all(math.isfinite(r[key]) for r in rows if "eval/reward" in r), key
    assert 0 <= rows[-1]["eval/rouge1"] <= 1 and "eval/win_rate" not in rows[-1]


def test_rouge_is_rouge_score_with_stemming():
    from rouge_score import rouge_scorer

    from tasks import summarize

    generations = ["the cats sat on mats", "nothing in common", "a cat sat on the mat"]
    references = ["a cat sat on the mat", "the cat sat", "a cat sat on the mat"]
    out = summarize.rouge(generations, references)
    assert out["rouge1"] == pytest.approx((10 / 11 + 0 + 1) / 3)  # stemming: cats -> cat, mats -> mat
    assert out["rouge2"] == pytest.approx((4 / 9 + 0 + 1) / 3)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert out["rougeL"] == pytest.approx(
        sum(scorer.score(r, g)["rougeL"].fmeasure for g, r in zip(generations, references)) / 3
    )


@pytest.mark.parametrize(
    "answer, choice",
    [
        ("Comparison: A is shorter and keeps the point.\nPreferred: A", "A"),
        ('Comparison: B says more.\nPreferred: "B"', "B"),
        ("B", "B"),
        (" 'A'. ", "A"),
        ("answer: b", "B"),
        ("Summary A misses it; Summary B does not.\nPreferred: B", "B"),
        ("Answer: A at first glance.\nOn reflection the second is tighter.\nPreferred: B", "B"),
        ("I cannot tell.", None),
        ("", None),
        ("Both A and B are fine", None),
    ],
)
def test_the_judges_answer_is_parsed(answer, choice):
    from tasks import summarize

    assert summarize.parse_choice(answer) == choice


def test_the_judges_order_is_random_per_item_and_balanced():
    from plumbing import UserError
    from tasks import summarize

    template = "Post: {post}\nSummary A: {summary_a}\nSummary B: {summary_b}\nPreferred:"
    always_a = summarize.Judge(lambda prompts: ["A"] * len(prompts), template, seed=1)
    n = 100
    assert always_a(["post"] * n, ["mine"] * n, ["theirs"] * n)["win_rate"] == 0.5  # position bias cancels exactly
    first = always_a.positions(n)
    assert (
        sum(first) == n // 2
        and first != sorted(first)
        and first != summarize.Judge(always_a.complete, template, seed=2).positions(n)
    )

    def prefers(summary):
        return lambda prompts: ["A" if f"Summary A: {summary}" in p else "B" for p in prompts]

    assert summarize.Judge(prefers("mine"), template, 1)(["post"] * 7, ["mine"] * 7, ["theirs"] * 7) == {
        "win_rate": 1.0,
        "judge_unparsed": 0.0,
    }
    assert (
        summarize.Judge(prefers("theirs"), template, 1)(["post"] * 7, ["mine"] * 7, ["theirs"] * 7)["win_rate"] == 0.0
    )
    odd = summarize.Judge(lambda prompts: ["A", "no idea", "B", "B"], template, 1)(
        ["p"] * 4, ["mine"] * 4, ["theirs"] * 4
    )
    assert odd["judge_unparsed"] == 0.25
    with pytest.raises(UserError, match="must contain"):
        summarize.Judge(always_a.complete, "Post: {post}\nA: {summary_a}", 1)


def test_best_of_n_keeps_the_rewards_argmax(tiny):
    """N samples per prompt; the kept one is the argmax of the reward among that prompt's N (here: its count of POSITIVE
    words)."""
    import common

    tokenizer = models.load_tokenizer(tiny["lm"])
    eval_lm = models.frozen(models.load_lm(tiny["lm"], torch.device("cpu")))
    words = POSITIVE + NEGATIVE
    drawn, calls = [], []

    def generate(query, query_mask, prefix, prefix_mask, max_new, min_new):
        ids = torch.tensor([tokenizer.convert_tokens_to_ids("\u2581" + w) for w in words])
        tokens = ids[torch.randint(len(ids), (len(query), int(max_new.max())))]
        drawn.append(common.decode_responses(tokenizer, tokens, torch.ones_like(tokens, dtype=torch.bool)))
        return tokens, max_new.clone()

    def value(text):  # the count of POSITIVE words; the text's characters break ties, the same way every time
        return sum(w in POSITIVE for w in text.split()) + sum(map(ord, text)) % 997 / 1000

    def reward(prompts, generations):
        calls.append(len(generations))
        return torch.tensor([value(g) for g in generations], dtype=torch.float64)

    args = types.SimpleNamespace(
        prompt_len=8, truncation_side="left", max_new_tokens=5, min_new_tokens=5, eval_best_of=4
    )
    pairs = [(f"the film {w}", " great") for w in NEGATIVE[:6]]
    metrics, samples = common.evaluate(
        generate, None, eval_lm, tokenizer, reward, pairs, args, torch.device("cpu"), seed=0, batch_size=4
    )
    candidates = [t for batch in drawn for t in batch]
    assert len(candidates) == 4 * len(pairs)
    kept = [max(candidates[4 * i : 4 * i + 4], key=value) for i in range(len(pairs))]  # prompt i's four, side by side
    assert [s["generation"] for s in samples] == kept[:4]
    assert calls == [16, 8]  # each candidate scored once; the kept ones are not scored again
    assert metrics["eval/reward"] == pytest.approx(sum(map(value, kept)) / len(pairs))
    args.eval_best_of = 1
    drawn.clear()
    plain, _ = common.evaluate(
        generate, None, eval_lm, tokenizer, reward, pairs, args, torch.device("cpu"), seed=0, batch_size=4
    )
    assert len([t for batch in drawn for t in batch]) == len(pairs) and plain["eval/reward"] < metrics["eval/reward"]


def test_a_judge_gives_the_win_rate_in_the_evaluation(tiny, tmp_path, reward_dir, monkeypatch):
    """--eval-judge with a local LM (the tiny one answers nonsense: every answer unparsed, no win counted)."""
    from tasks import summarize

    monkeypatch.setattr(summarize, "JUDGE_MAX_TOKENS", 16)  # the tiny LM has 128 positions
    prompt = tmp_path / "judge.txt"
    prompt.write_text("{post} A: {summary_a} B: {summary_b} Preferred:")
    _, rows = run(
        "ppo",
        tiny,
        tmp_path / "run",
        task="tldr",
        dataset_name=tiny["tldr"],
        reward_model_name=reward_dir[0],
        num_iterations=1,
        min_new_tokens=0,
        prompt_len=24,
        eval_size=6,
        lora_r=0,
        critic="shared",
        eval_judge=tiny["lm"],
        eval_judge_prompt=str(prompt),
    )
    assert rows[-1]["eval/judge_unparsed"] == 1.0 and rows[-1]["eval/win_rate"] == 0.0


def test_a_learned_reward_model_replaces_the_tasks_reward(tiny, tmp_path, reward_dir):
    """--reward-model-name DIR of reward_model.py on another task (the imdb code path): the run's reward is its raw
    score."""
    import tasks

    args = types.SimpleNamespace(task="imdb", reward_model_name=reward_dir[0], dtype="float32", seed=1)
    assert isinstance(tasks.load_reward(args, None, None, torch.device("cpu")), learned_reward.LearnedReward)
    _, rows = run("ppo", tiny, tmp_path, reward_model_name=reward_dir[0], num_iterations=1)
    assert all(math.isfinite(r["eval/reward"]) for r in rows)


def test_tldr_offline_fails_fast_with_the_hub_names():
    done, seconds = cli("ppo.py", "--task", "tldr")
    assert done.returncode == 2 and seconds < 60
    for needed in (
        "cannot reach the Hugging Face hub",
        "--dataset-name CarperAI/openai_summarize_tldr",
        "--model-name CarperAI/openai_summarize_tldr_sft",
        "--task rotten-tomatoes",
    ):
        assert needed in done.stderr, done.stderr
    done, _ = cli("reward_model.py", "--task", "tldr")
    assert done.returncode == 2 and "--dataset-name CarperAI/openai_summarize_comparisons" in done.stderr, done.stderr


def test_tldr_needs_a_reward_model_and_the_judge_needs_its_prompt(tiny, tmp_path, reward_dir):
    done, _ = cli(
        "ppo.py",
        "--task",
        "tldr",
        "--dataset-name",
        tiny["tldr"],
        "--model-name",
        tiny["lm"],
        "--eval-lm-name",
        tiny["lm"],
    )
    assert (
        done.returncode == 2
        and "--task tldr needs --reward-model-name" in done.stderr
        and "reward_model.py --task tldr" in done.stderr
    )
    done, _ = cli(
        "ppo.py",
        "--task",
        "tldr",
        "--dataset-name",
        tiny["tldr"],
        "--model-name",
        tiny["lm"],
        "--eval-lm-name",
        tiny["lm"],
        "--reward-model-name",
        reward_dir[0],
        "--eval-judge",
        tiny["lm"],
        "--output-dir",
        str(tmp_path),
        "--lora-r",
        "0",
        "--critic",
        "shared",
    )
    # the preset's prompt (the paper's) is longer than the tiny judge's 128 positions: said in one line
    assert done.returncode == 2 and "longer than the judge's context (128 tokens)" in done.stderr, done.stderr
    done, _ = cli(*done.args[1:], "--eval-judge-prompt", "None")
    assert done.returncode == 2 and "--eval-judge needs --eval-judge-prompt" in done.stderr, done.stderr
    done, _ = cli("ppo.py", "--eval-judge", tiny["lm"])
    assert done.returncode == 2 and "the judged win rate is a tldr metric" in done.stderr
    done, _ = cli("ppo.py", "--task", "concepts", "--eval-best-of", "4", "--eval-num-beams", "3")
    assert done.returncode == 2 and "--eval-best-of needs sampled evaluations" in done.stderr


def test_a_long_post_keeps_tldr_and_every_scorer_sees_the_policys_prompt(tiny):
    """A post longer than --prompt-len loses its end, not its "\\nTL;DR:": the prompt still ends with it and fits in
    prompt_len tokens, so the policy's own tokenization cuts nothing (what the reward model, the judge and ROUGE are
    given is the text the policy read). With SmolLM2's tokenizer, and on the tiny files end to end."""
    from tasks import summarize

    tokenizer = models.load_tokenizer("smollm2-135m")
    post = "SUBREDDIT: r/advice\nTITLE: long\nPOST: " + " ".join(
        f"I have thought about this for day {i}." for i in range(150)
    )
    fitted = summarize.fit_prompt(post + "\nTL;DR:", tokenizer, 64)
    assert fitted.endswith("\nTL;DR:") and fitted.startswith("SUBREDDIT: r/advice\nTITLE: long\nPOST: I have thought")
    assert 60 <= len(tokenizer(fitted, add_special_tokens=False).input_ids) <= 64
    assert summarize.fit_prompt("POST: short\nTL;DR:", tokenizer, 64) == "POST: short\nTL;DR:"  # fits: untouched
    tiny_tokenizer = models.load_tokenizer(tiny["lm"])
    data, reward_data = summarize.load_tldr(tiny["tldr"], tiny_tokenizer, 8)
    for prompt, _ in data["train"] + data["validation"]:
        assert prompt.endswith("\nTL;DR:") and len(tiny_tokenizer(prompt, add_special_tokens=False).input_ids) <= 8
        assert prompt in reward_data["references"]  # ROUGE and the judge look references up by the policy's prompt


def test_the_papers_judge_prompt_is_the_tldr_default_and_its_answers_parse():
    """App. C.2's prompt ships as the tldr preset's --eval-judge-prompt; rendered for a post and two summaries it holds
    them, and an answer in the format it asks for ("Comparison: ...", then "Preferred: (A)") parses."""
    import tasks
    from conftest import script
    from tasks import summarize

    path = tasks.defaults(script("ppo").Args, "tldr").eval_judge_prompt
    template = open(path).read()
    assert path == summarize.PAPER_JUDGE_PROMPT and "You are an expert summary evaluator" in template
    assert "Preferred: <(A) or (B)>" in template and all(p in template for p in summarize.PLACEHOLDERS)
    seen = []
    judge = summarize.Judge(
        lambda prompts: seen.extend(prompts) or ["Comparison: (A) is shorter.\nPreferred: (A)"] * 2, template, 0
    )
    out = judge(["my post"] * 2, ["mine"] * 2, ["theirs"] * 2)
    assert "context: my post\n" in seen[0] and {
        "tldr (A): mine\ntldr (B): theirs",
        "tldr (A): theirs\ntldr (B): mine",
    } == {p[p.index("tldr (A)") : p.index("\nFIRST")] for p in seen}
    assert out == {"win_rate": 0.5, "judge_unparsed": 0.0}
    for answer, choice in (("Comparison: B is clearer.\nPreferred: (B)", "B"), ("Preferred: (A)", "A")):
        assert summarize.parse_choice(answer) == choice
