"""Invariants of the five algorithm scripts, run end to end on the tiny assets (see conftest.py)."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import GUIDE_TOKEN, run
from plumbing import models

SCRIPTS = ["ppo", "ppo_pp", "aggrevated", "lols", "d2lols"]
# masked_mean calls of the loss per minibatch step, and which of them are the policy loss's (their union) and the value
# loss's
CALLS_PER_STEP = {"ppo": 3, "ppo_pp": 3, "aggrevated": 3, "d2lols": 3, "lols": 4}
POLICY_CALLS = {"lols": (0, 1)}
VALUE_CALL = {"lols": 2}


def updates(seen, name):
    """Per iteration: (rollout, policy mask, [(policy mask rows, value mask rows) of each minibatch step])."""
    chunks, current = [], None
    for call in seen["masked_means"]:
        if isinstance(call, str):
            current = []
            chunks.append(current)
        elif current is not None:
            current.append(call)
    out = []
    for rollout, policy_mask, calls in zip(seen["rollouts"], seen["policy_masks"], chunks):
        k = CALLS_PER_STEP[name]
        assert len(calls) % k == 0
        steps = []
        for i in range(0, len(calls), k):
            step = calls[i : i + k]
            policy = torch.zeros_like(step[0].bool())
            for j in POLICY_CALLS.get(name, (0,)):
                policy |= step[j].bool()
            steps.append((policy, step[VALUE_CALL.get(name, 1)]))
        out.append((rollout, policy_mask, steps))
    return out


def rows(mask):
    return {tuple(r) for r in mask.tolist()}


def check_masks(iteration, expected_policy, expected_value):
    rollout, policy_mask, steps = iteration
    assert torch.equal(policy_mask, expected_policy)
    for policy_rows, value_rows in steps:  # each minibatch's masks are rows of the batch's masks
        assert rows(policy_rows) <= rows(expected_policy)
        assert rows(value_rows) <= rows(expected_value)


@pytest.mark.parametrize(
    "name, flags",
    [("ppo_pp", dict(beta=0.0)), ("lols", dict(alpha=1.0, beta=0.0)), ("d2lols", dict(alpha=0, beta=0.0))],
)
def test_guide_off_reproduces_ppo(tiny, tmp_path, name, flags):
    """With the guide switched off (PPO++ beta = 0; LOLS alpha = 1, beta = 0; D2LOLS alpha = 0, beta_ppo_pp = 0) each
    script is ppo.py: the same numbers iteration after iteration (PPO++: to the last digit)."""
    _, ppo = run("ppo", tiny, tmp_path / "ppo", num_iterations=3)
    _, other = run(name, tiny, tmp_path / name, num_iterations=3, **flags)
    assert len(ppo) == len(other) == 4
    exact = (
        name == "ppo_pp"
    )  # two value heads change float summation order in the trunk's gradient: 1e-5 (1e-6 absolute) holds
    for a, b in zip(ppo, other):
        shared = {k for k in a if not k.startswith("time/")}
        assert {k: a[k] for k in shared} == (
            {k: b[k] for k in shared} if exact else {k: pytest.approx(b[k], rel=1e-5, abs=1e-6) for k in shared}
        )
        assert b.get("rlgf/guide_rollin_share", 0.0) == 0.0
    assert ppo[-1]["train/kl"] != 0.0  # the policy really moved


def test_ppo_covers_every_response_token(tiny, tmp_path, spy):
    run("ppo", tiny, tmp_path, num_iterations=1)
    (iteration,) = updates(spy, "ppo")
    rollout = iteration[0]
    assert not rollout["by_guide"].any() and (rollout["restart_at"] == 0).all()
    check_masks(iteration, rollout["response_mask"], rollout["response_mask"])


def test_ppo_pp_restarts_from_guide_prefix(tiny, tmp_path, spy):
    """beta = 1: every sample starts with the guide's first h tokens (h uniform on 1..N-1), pi_theta continues, and
    the policy and value losses cover pi_theta's tokens only."""
    run("ppo_pp", tiny, tmp_path, num_iterations=2, beta=1.0, guide_name="conftest:constant_guide")
    n = 6
    for iteration in updates(spy, "ppo_pp"):
        rollout = iteration[0]
        h = rollout["restart_at"]
        assert ((h >= 1) & (h <= n - 1)).all()
        positions = torch.arange(n)[None]
        assert torch.equal(rollout["by_guide"], positions < h[:, None])
        assert (rollout["response"][rollout["by_guide"]] == GUIDE_TOKEN).all()
        assert rollout["response_mask"].all()
        mine = rollout["response_mask"] & ~rollout["by_guide"]
        check_masks(iteration, mine, mine)


def test_aggrevated_masks(tiny, tmp_path, spy):
    """beta = 0: pi_theta rolls in h tokens, the guide completes; the policy loss covers the rollin tokens and the
    critic V^{pi_g} the guide's tokens."""
    run("aggrevated", tiny, tmp_path, num_iterations=2, beta=0.0, guide_name="conftest:constant_guide")
    for iteration in updates(spy, "aggrevated"):
        rollout = iteration[0]
        h = rollout["restart_at"]
        assert ((h >= 1) & (h <= 5)).all()
        assert torch.equal(rollout["by_guide"], torch.arange(6)[None] >= h[:, None])
        assert (rollout["response"][rollout["by_guide"]] == GUIDE_TOKEN).all()
        check_masks(iteration, ~rollout["by_guide"], rollout["by_guide"])


def test_aggrevated_guide_only_samples_train_only_the_critic(tiny, tmp_path, spy):
    """beta = 1: every sample is the guide's: no policy-loss token at all, the critic still learns."""
    run_dir, metrics = run(
        "aggrevated", tiny, tmp_path, num_iterations=1, beta=1.0, guide_name="conftest:constant_guide"
    )
    (iteration,) = updates(spy, "aggrevated")
    assert iteration[0]["by_guide"].all()
    check_masks(iteration, torch.zeros_like(iteration[1]), iteration[0]["by_guide"])
    assert metrics[1]["loss/policy"] == 0.0 and metrics[1]["rlgf/policy_token_share"] == 0.0
    assert metrics[1]["loss/value"] > 0.0


def test_lols_mixes_per_sample_within_a_batch(tiny, tmp_path, spy):
    """alpha = 0.5: one batch holds PPO++ samples (pi_theta rolls out, critic on its tokens) and AggreVaTeD samples
    (the guide rolls out, critic on the guide's tokens)."""
    _, metrics = run(
        "lols",
        tiny,
        tmp_path,
        num_iterations=2,
        alpha=0.5,
        beta=0.0,
        rollouts_per_iteration=16,
        guide_name="conftest:constant_guide",
    )
    for iteration in updates(spy, "lols"):
        rollout = iteration[0]
        aggrevated_sample = rollout["by_guide"].any(1)  # beta = 0: only AggreVaTeD samples contain guide tokens
        assert 0 < aggrevated_sample.sum() < 16
        assert (rollout["restart_at"][~aggrevated_sample] == 0).all()
        value_mask = torch.where(aggrevated_sample[:, None], rollout["by_guide"], ~rollout["by_guide"])
        check_masks(iteration, ~rollout["by_guide"], value_mask)
    assert all(0 < m["rlgf/ppo_pp_share"] < 1 for m in metrics[1:])


def test_d2lols_switches_at_alpha(tiny, tmp_path, spy):
    """alpha = 2: iterations 1-2 are AggreVaTeD (guide rollouts), iteration 3 onward PPO++ (beta_ppo_pp = 1: guide
    rollins)."""
    _, metrics = run(
        "d2lols",
        tiny,
        tmp_path,
        num_iterations=4,
        alpha=2,
        beta_aggrevated=0.0,
        beta_ppo_pp=1.0,
        guide_name="conftest:constant_guide",
    )
    phases = [m["rlgf/aggrevated_phase"] for m in metrics[1:]]
    assert phases == [1, 1, 0, 0]
    for i, iteration in enumerate(updates(spy, "d2lols")):
        rollout = iteration[0]
        h, positions = rollout["restart_at"], torch.arange(6)[None]
        if i < 2:
            assert torch.equal(rollout["by_guide"], positions >= h[:, None])
            check_masks(iteration, ~rollout["by_guide"], rollout["by_guide"])
        else:
            assert torch.equal(rollout["by_guide"], positions < h[:, None])
            check_masks(iteration, ~rollout["by_guide"], ~rollout["by_guide"])


def value_head(run_dir):
    state = torch.load(os.path.join(run_dir, "checkpoint", "training_state.pt"), weights_only=True)
    return state["value_head"]["weight"]


@pytest.mark.parametrize("alpha, trained_rows", [(0, [0]), (2, [1])])
def test_d2lols_critic_per_phase(tiny, tmp_path, alpha, trained_rows):
    """Value head rows: 0 = V^{pi_theta}, 1 = V^{pi_g}. Only the current phase's critic ever gets a gradient."""
    run_dir, _ = run("d2lols", tiny, tmp_path, num_iterations=2, alpha=alpha)
    weight = value_head(run_dir)
    for row in (0, 1):
        assert (weight[row].abs().sum() > 0) == (row in trained_rows)


def test_lols_trains_both_critics(tiny, tmp_path):
    run_dir, _ = run("lols", tiny, tmp_path, num_iterations=2, alpha=0.5, rollouts_per_iteration=16)
    assert (value_head(run_dir).abs().sum(1) > 0).all()


@pytest.mark.parametrize("name", SCRIPTS[1:])
def test_guide_and_reference_stay_frozen(tiny, tmp_path, monkeypatch, name):
    """The guide (here a different model, lm2) and the KL reference are bit-identical before and after a run."""

    loaded = {}
    load, load_both = models.load_lm, models.load_reference_and_policy

    def record(path, device, *dtype):
        model = load(path, device, *dtype)
        loaded.setdefault(path, []).append(model)
        return model

    def record_reference(args, *rest):
        reference, policy = load_both(args, *rest)
        loaded["reference"] = reference
        return reference, policy

    monkeypatch.setattr(models, "load_lm", record)
    monkeypatch.setattr(models, "load_reference_and_policy", record_reference)
    extra = {"alpha": 1} if name == "d2lols" else {}
    run(name, tiny, tmp_path, guide_name=tiny["lm2"], beta=0.5, **extra)
    guide, reference = loaded[tiny["lm2"]][0], loaded["reference"]
    assert reference is not None and guide is not reference
    for model, path in ((guide, tiny["lm2"]), (reference, tiny["lm"])):
        fresh = AutoModelForCausalLM.from_pretrained(path).state_dict()
        for key, value in model.state_dict().items():
            assert torch.equal(value, fresh[key]), key


@pytest.mark.parametrize("name", SCRIPTS)
def test_end_to_end(tiny, tmp_path, name):
    """Each script writes metrics.jsonl (eval at 0 and at the end) and a from_pretrained checkpoint that moved."""
    run_dir, metrics = run(name, tiny, tmp_path, num_iterations=2, eval_every=0)
    assert [m["iteration"] for m in metrics] == [0, 1, 2]
    assert all(math.isfinite(v) for m in metrics for v in m.values() if isinstance(v, float))
    for key in ("eval/reward", "eval/perplexity", "eval/output_perplexity"):
        assert key in metrics[0] and key in metrics[-1] and key not in metrics[1]
    for key in (
        "train/reward",
        "train/kl",
        "loss/policy",
        "loss/value",
        "loss/mle",
        "episodes",
        "grad_norm",
        "policy/entropy",
    ):
        assert key in metrics[1]
    assert metrics[-1]["episodes"] == 2 * metrics[1]["episodes"] > 0 and metrics[1]["grad_norm"] > 0
    assert 0 < metrics[-1]["eval/reward"] < 1 and metrics[-1]["eval/perplexity"] > 1
    if name != "ppo":
        assert "eval/guide_reward" in metrics[0]
        assert {"rlgf/guide_rollin_share", "rlgf/restart_mean", "rlgf/policy_token_share"} <= set(metrics[1])
    trained = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "checkpoint"))
    start = AutoModelForCausalLM.from_pretrained(tiny["lm"])
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), start.state_dict().values()))
    samples = [json.loads(line) for line in open(os.path.join(run_dir, "samples.jsonl"))]
    assert samples and {"prompt", "generation", "reward"} <= set(samples[0])


@pytest.mark.parametrize("name", [*SCRIPTS, "sft"])
def test_eval_split_test_evaluates_on_the_test_prompts(tiny, tmp_path, name):
    """--eval-split test: the evaluation before training generates from the test split's prompts, not validation's."""
    import tasks
    from conftest import script, tiny_args

    module = script(name)
    args = tiny_args(module, tiny, tmp_path, eval_split="test", num_iterations=0, num_epochs=0.1, batch_size=8)
    module.main(args)
    data, _ = tasks.load_data(args, models.load_tokenizer(args.model_name))
    (run_dir,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    samples = [json.loads(line) for line in open(os.path.join(run_dir, "samples.jsonl"))]
    prompts = [s["prompt"] for s in samples if s["iteration"] == 0]
    assert prompts == [p for p, _ in data["test"][:4]] and not set(prompts) & {p for p, _ in data["validation"]}


@pytest.mark.parametrize("name", SCRIPTS)
def test_resume_continues_exactly(tiny, tmp_path, monkeypatch, name):
    """A run that crashes right after its iteration-1 checkpoint and is resumed gives the same iterations 2-3 and the
    same final weights as an uninterrupted run, under a linear learning-rate schedule (the scheduler's state matters;
    d2lols: the switch happens across the restart)."""
    from conftest import stopped_then_resumed

    extra = (
        {"alpha": 1, "lr_schedule": "linear", "save_every": 1}
        if name == "d2lols"
        else {"lr_schedule": "linear", "save_every": 1}
    )
    straight_dir, straight, run_dir, resumed = stopped_then_resumed(
        name, tiny, tmp_path, monkeypatch, num_iterations=3, **extra
    )
    assert [m["iteration"] for m in resumed] == [0, 1, 2, 3]
    for a, b in zip(straight[2:], resumed[2:]):
        assert {k: v for k, v in a.items() if not k.startswith("time/")} == {
            k: v for k, v in b.items() if not k.startswith("time/")
        }
    final = load_file(os.path.join(run_dir, "checkpoint", "model.safetensors"))
    expected = load_file(os.path.join(straight_dir, "checkpoint", "model.safetensors"))
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)


def test_sft_checkpoint_feeds_the_rl_scripts(tiny, tmp_path):
    """sft.py fine-tunes on the positive examples, evaluates before/after, and its checkpoint is a --model-name."""
    sft_dir, sft_metrics = run("sft", tiny, tmp_path / "sft", num_epochs=1.0, batch_size=8)
    assert "eval/reward" in sft_metrics[0] and "eval/reward" in sft_metrics[-1]
    assert sft_metrics[-1]["eval/perplexity"] < sft_metrics[0]["eval/perplexity"]  # it learned the review texts
    checkpoint = os.path.join(sft_dir, "checkpoint")
    _, metrics = run("ppo_pp", tiny, tmp_path / "rl", num_iterations=1, model_name=checkpoint)
    assert metrics[0]["eval/perplexity"] == pytest.approx(sft_metrics[-1]["eval/perplexity"], rel=1e-4)
