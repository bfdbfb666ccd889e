"""grpo.py and grpo_pp.py: the group advantage, beta = 0, the guide's tokens, the all-fail trigger, end to end,
resume."""

import math
import os
import statistics

import pytest
import torch
from safetensors.torch import load_file

from conftest import GUIDE_TOKEN, run


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_match_a_plain_loop(scale):
    import common

    rewards = torch.tensor([0.1, 0.5, 0.2, 0.9, 1.0, 1.0, 1.0, 1.0, -2.0, 3.0, 0.0, 0.5])
    expected = []
    for g in range(0, len(rewards), 4):
        group = rewards[g : g + 4].tolist()
        mean, std = statistics.mean(group), statistics.stdev(group)
        expected += [(r - mean) / (std + 1e-4) if scale else r - mean for r in group]
    torch.testing.assert_close(common.group_advantages(rewards, 4, scale), torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_grpo_pp_with_beta_zero_is_grpo(tiny, tmp_path):
    _, grpo = run("grpo", tiny, tmp_path / "grpo", num_iterations=3)
    _, other = run("grpo_pp", tiny, tmp_path / "grpo_pp", num_iterations=3, beta=0.0)
    assert len(grpo) == len(other) == 4
    for a, b in zip(grpo, other):
        assert {k: v for k, v in a.items() if not k.startswith("time/")} == {
            k: b[k] for k in a if not k.startswith("time/")
        }
    assert grpo[-1]["train/kl"] != 0.0 and grpo[1]["loss/policy"] != 0.0


def record(monkeypatch):
    """Every call of generate_with_restarts (its rollin choices and output) and every mask under a loss term."""
    import common

    seen = {"calls": [], "loss_masks": []}
    generate, mean = common.generate_with_restarts, common.masked_mean

    def generate_spy(samplers, query, query_mask, rollin_by, *args, **kwargs):
        out = generate(samplers, query, query_mask, rollin_by, *args, **kwargs)
        seen["calls"].append(
            dict(query=query.clone(), rollin_by=rollin_by.clone(), **{k: v.clone() for k, v in out.items()})
        )
        return out

    def mean_spy(x, mask, *whole):
        if torch.is_grad_enabled() and x.requires_grad:
            seen["loss_masks"].append(mask.clone())
        return mean(x, mask, *whole)

    monkeypatch.setattr(common, "generate_with_restarts", generate_spy)
    monkeypatch.setattr(common, "masked_mean", mean_spy)
    return seen


def test_grpo_pp_gives_the_guides_tokens_no_loss(tiny, tmp_path, monkeypatch):
    """beta = 1 with a guide that writes only GUIDE_TOKEN: every policy-loss mask covers exactly pi_theta's tokens of
    its rows (no token at t < h), and the groups' samples all restart."""
    seen = record(monkeypatch)
    _, metrics = run(
        "grpo_pp", tiny, tmp_path, num_iterations=2, beta=1.0, guide_name="conftest:constant_guide", ppo_epochs=1
    )
    assert metrics[1]["rlgf/guide_rollin_share"] == 1.0
    rollout = seen["calls"][-1]
    policy = rollout["response_mask"] & ~rollout["by_guide"]
    assert rollout["by_guide"].any() and (rollout["response"][rollout["by_guide"]] == GUIDE_TOKEN).all()
    pg_masks = seen["loss_masks"][-4::2]  # the last iteration: 2 minibatch steps, each (policy loss, MLE)
    rows = {tuple(r) for r in policy.tolist()}
    assert all({tuple(r) for r in m.tolist()} <= rows for m in pg_masks) and sum(int(m.sum()) for m in pg_masks) == int(
        policy.sum()
    )


def test_guide_when_all_fail_guides_exactly_the_failing_groups(tiny, tmp_path, monkeypatch):
    """A reward of 0 for some prompts, and 0 or 1 by generation for the others: with --guide-when-all-fail 0.5 and
    beta = 1, after a first unguided pass exactly the rows of the groups that ALL scored 0 are sampled again (not those
    with some 0s), every one with a guide rollin."""
    import tasks

    scored = []

    def reward(prompts, generations):
        scores = torch.tensor(
            [0.0 if sum(map(ord, p)) % 2 else float(sum(map(ord, g)) % 3 != 0) for p, g in zip(prompts, generations)]
        )
        scored.append(scores)
        return scores

    monkeypatch.setattr(tasks, "load_reward", lambda *args: reward)
    seen = record(monkeypatch)
    _, metrics = run(
        "grpo_pp",
        tiny,
        tmp_path,
        num_iterations=3,
        beta=1.0,
        guide_when_all_fail=0.5,
        rollouts_per_iteration=16,
        eval_every=0,
        eval_size=4,
    )
    firsts = [i for i, c in enumerate(seen["calls"]) if len(c["query"]) == 16]
    first_scores = [s for s in scored if len(s) == 16][::2]  # per iteration: the first pass, then the final batch
    assert len(firsts) == len(first_scores) == 3
    guided = mixed = 0
    for i, scores in zip(firsts, first_scores):
        mixed += ((scores.view(-1, 4) < 0.5).any(1) & ~(scores.view(-1, 4) < 0.5).all(1)).sum().item()
        assert (seen["calls"][i]["rollin_by"] == -1).all()  # the first pass: every sample pi_theta's own
        failing = (scores.view(-1, 4) < 0.5).all(1).repeat_interleave(4).nonzero().squeeze(1)
        if len(failing):
            again = seen["calls"][i + 1]
            assert torch.equal(again["query"], seen["calls"][i]["query"][failing]) and (again["rollin_by"] == 1).all()
        else:
            assert i + 1 == len(seen["calls"]) or len(seen["calls"][i + 1]["query"]) == 16
        guided += len(failing)
    assert 0 < guided < 48 and mixed > 0  # some groups failed, some did not, some failed in part
    assert sum(m["rlgf/guide_rollin_share"] for m in metrics[1:]) * 16 == guided


def test_beta_schedule_linear_anneals_the_guide_share(tiny, tmp_path):
    """--beta-schedule linear with beta = 1 over 4 iterations: the guide rolls in for every sample of the first
    iteration (beta 1), then for fewer (0.75, 0.5, 0.25 per sample), never for all again."""
    _, metrics = run(
        "grpo_pp",
        tiny,
        tmp_path,
        num_iterations=4,
        beta=1.0,
        beta_schedule="linear",
        rollouts_per_iteration=16,
        minibatch_size=16,
        ppo_epochs=1,
        eval_every=0,
        eval_size=4,
    )
    shares = [m["rlgf/guide_rollin_share"] for m in metrics[1:]]
    assert shares[0] == 1.0 and all(s < 1.0 for s in shares[1:]) and shares[3] < 0.75, shares


@pytest.mark.parametrize("name", ["grpo", "grpo_pp"])
def test_end_to_end_and_resume(tiny, tmp_path, monkeypatch, name):
    """Each script logs finite numbers that move, writes a from_pretrained checkpoint, and a run stopped right after
    its iteration-1 checkpoint resumes to the uninterrupted run's numbers and weights (linear schedule; grpo_pp with
    an annealed guide share)."""
    from conftest import stopped_then_resumed

    flags = dict(num_iterations=3, save_every=1, lr_schedule="linear", beta=0.5, beta_schedule="linear")
    straight_dir, straight, run_dir, resumed = stopped_then_resumed(name, tiny, tmp_path, monkeypatch, **flags)
    assert [m["iteration"] for m in straight] == [0, 1, 2, 3]
    assert all(v is None or v == v for m in straight for v in m.values() if not isinstance(v, str))
    assert straight[1]["grad_norm"] > 0 and straight[-1]["train/kl"] != 0 and "train/group_reward_std" in straight[1]
    if name == "grpo_pp":
        assert "eval/guide_reward" in straight[0] and "rlgf/guide_rollin_share" in straight[1]
    drop = lambda row: {k: v for k, v in row.items() if not k.startswith("time/")}  # noqa: E731
    assert [drop(r) for r in resumed] == [drop(r) for r in straight]
    a, b = (load_file(os.path.join(d, "checkpoint", "model.safetensors")) for d in (straight_dir, run_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


SETTINGS = dict(
    kl_coef=0.3,
    mle_coef=0.7,
    clip_range=0.1,
    learning_rate=3e-2,
    ppo_epochs=2,
    rollouts_per_iteration=16,
    minibatch_size=4,
    eval_every=0,
    guide_name="conftest:constant_guide",
)


@pytest.mark.parametrize(
    "name, extra", [("grpo", {}), ("grpo", dict(scale_rewards=False)), ("grpo_pp", dict(beta=0.5))]
)
def test_objective_by_hand(tiny, tmp_path, recorder, name, extra):
    """Every backpropagated loss, recomputed with plain loops from what the run recorded: R = score - lambda_kl x the
    sum of log pi_theta - log pi_0 over pi_theta's tokens, the group advantage, the clipped ratio loss over pi_theta's
    tokens, plus eta x the NLL of the references; the clip binds somewhere (the ratio leaves 1 +- 0.1)."""
    run(name, tiny, tmp_path, num_iterations=2, **{**SETTINGS, **extra})
    its = []
    for kind, data in recorder:
        if kind == "rollout":
            its.append(dict(rollout=data, scores=None, forwards=[], perms=[], losses=[]))
        elif not its:
            continue
        elif kind == "reward" and its[-1]["scores"] is None:
            its[-1]["scores"] = data
        elif kind == "forward":
            its[-1]["forwards"].append(data)
        elif kind == "randperm":
            its[-1]["perms"].append(data)
        elif kind == "backward":
            its[-1]["losses"].append(data)
    assert len(its) == 2
    clipped = False
    for it in its:
        rollout, scores = it["rollout"], it["scores"].tolist()
        old, ref = it["forwards"][0]["logprobs"], it["forwards"][1]["logprobs"]
        steps = [f for f in it["forwards"] if f["grad"]]
        mask = (rollout["response_mask"] & ~rollout["by_guide"]).tolist()
        rewards = [
            scores[i] - 0.3 * sum(old[i, t].item() - ref[i, t].item() for t in range(len(mask[i])) if mask[i][t])
            for i in range(16)
        ]
        advantages = []
        for g in range(0, 16, 4):
            group = rewards[g : g + 4]
            mean, std = statistics.mean(group), statistics.stdev(group)
            advantages += [(r - mean) / (std + 1e-4) if extra.get("scale_rewards", True) else r - mean for r in group]
        order = [i for perm in it["perms"] for i in perm.tolist()]
        assert len(steps) == 2 * 8 and len(it["losses"]) == 8
        for k in range(8):
            rows, new, mle = order[4 * k : 4 * k + 4], steps[2 * k]["logprobs"], steps[2 * k + 1]
            total, count = 0.0, 0
            for j, i in enumerate(rows):
                for t in range(len(mask[i])):
                    if mask[i][t]:
                        ratio = math.exp(new[j, t].item() - old[i, t].item())
                        clipped |= abs(ratio - 1) > 0.1
                        total += max(-advantages[i] * ratio, -advantages[i] * min(max(ratio, 0.9), 1.1))
                        count += 1
            nll = -(mle["logprobs"] * mle["response_mask"]).sum().item() / mle["response_mask"].sum().item()
            assert it["losses"][k] == pytest.approx(total / max(count, 1) + 0.7 * nll, rel=1e-4, abs=1e-5), (k, name)
    assert clipped


@pytest.mark.parametrize("name", ["grpo", "grpo_pp"])
def test_reward_rises_on_a_tiny_task(tiny, tmp_path, monkeypatch, name):
    """The share of positive words; the guide writes only positive words: the policy's own validation reward rises."""
    import tasks
    from conftest import PositiveWords

    events = []
    monkeypatch.setattr(tasks, "load_reward", lambda *args: PositiveWords(events))
    _, metrics = run(
        name,
        tiny,
        tmp_path,
        num_iterations=8,
        rollouts_per_iteration=16,
        minibatch_size=8,
        ppo_epochs=2,
        learning_rate=1e-2,
        eval_every=0,
        eval_size=16,
        guide_name="conftest:constant_guide",
        beta=0.5 if name == "grpo_pp" else 0.0,
    )
    rewards = [m["eval/reward"] for m in metrics if "eval/reward" in m]
    assert events and rewards[-1] > rewards[0] + 0.15, rewards


def test_guide_when_all_fail_redraws_only_the_guided_members(tiny, tmp_path, monkeypatch):
    """--guide-when-all-fail with beta 0 is GRPO to the last digit: no member is drawn again (here every group fails:
    the reward is below 2). With beta 0.5 only the members whose coin says "guide" are sampled again, the others keep
    their own sample and its gradient."""
    flags = dict(num_iterations=2, rollouts_per_iteration=16, eval_every=0, eval_size=4)
    _, grpo = run("grpo", tiny, tmp_path / "grpo", **flags)
    _, other = run("grpo_pp", tiny, tmp_path / "grpo_pp", beta=0.0, guide_when_all_fail=2.0, **flags)
    for a, b in zip(grpo, other):
        assert {k: v for k, v in a.items() if not k.startswith("time/")} == {
            k: b[k] for k in a if not k.startswith("time/")
        }
    seen = record(monkeypatch)
    _, metrics = run("grpo_pp", tiny, tmp_path / "half", beta=0.5, guide_when_all_fail=2.0, **flags)
    firsts = [i for i, c in enumerate(seen["calls"]) if len(c["query"]) == 16 and (c["rollin_by"] == -1).all()]
    for i, share in zip(firsts, [m["rlgf/guide_rollin_share"] for m in metrics[1:]]):
        again = seen["calls"][i + 1]
        assert 0 < len(again["query"]) == share * 16 < 16 and (again["rollin_by"] == 1).all()
