"""The objective of every script, recomputed by hand. Each script runs on the tiny assets while the `recorder`
fixture (conftest.py) records its rollouts, forward passes, minibatch orders and backpropagated losses; this file then
recomputes, with plain per-sample loops written from the paper (Alg. 1-4, Sec. 5, App. C.1), the rewards, the KL
penalty, the advantages (A^{pi_theta} or A^{pi_g}), the whitening, the clipped policy and value losses, the MLE term and
their sum, and checks each against what the script logged and backpropagated. A flipped sign, a swapped argument, a
wrong mask or a wrong critic in any one script makes its case fail."""

import json
import math
import os

import pytest
import torch

from common import GUIDE, NO_ROLLIN, POLICY
from conftest import iterations, run

# Settings that make every term of the loss matter: distinct gamma and lambda, a KL term that is not negligible, a large
# learning rate and two epochs so that the ratio leaves the clip range, a tiny value clip range so that it binds.
SETTINGS = dict(
    gamma=0.9,
    gae_lambda=0.6,
    kl_coef=0.3,
    mle_coef=0.7,
    vf_coef=0.4,
    clip_range=0.1,
    vf_clip_range=0.02,
    learning_rate=3e-2,
    vf_learning_rate=3e-2,
    ppo_epochs=2,
    rollouts_per_iteration=16,
    minibatch_size=4,
    eval_every=0,
    guide_name="conftest:constant_guide",
)

CASES = {  # script, extra flags, what kind of sample each iteration holds
    "ppo": ("ppo", {}),
    "ppo_pp": ("ppo_pp", dict(beta=0.5)),
    "aggrevated": ("aggrevated", dict(beta=0.25)),
    "aggrevated-variable-length": (
        "aggrevated",
        dict(beta=0.25, min_new_tokens=1, rollouts_per_iteration=64, minibatch_size=16),
    ),
    "lols": ("lols", dict(alpha=0.5, beta_aggrevated=0.25, beta_ppo_pp=0.5)),
    "d2lols": ("d2lols", dict(alpha=1, beta_aggrevated=0.25, beta_ppo_pp=0.5)),
}


def sample_kinds(name, rollout, iteration, extra):
    """Per sample: is it an AggreVaTeD sample (the guide rolls out, critic V^{pi_g}), and which value head scores it.
    Also checks that each sample's rollin and rollout follow its algorithm."""
    rollin_by, rollout_by = rollout["rollin_by"].tolist(), rollout["rollout_by"].tolist()
    if name == "d2lols":
        phase = iteration <= extra["alpha"]
        assert all(r == (GUIDE if phase else POLICY) for r in rollout_by)
    if name == "ppo":
        assert all(r == NO_ROLLIN for r in rollin_by) and all(r == POLICY for r in rollout_by)
    aggrevated = [r == GUIDE for r in rollout_by]
    for a, rin in zip(aggrevated, rollin_by):  # AggreVaTeD: pi_theta or nobody rolls in; PPO++: the guide or nobody
        assert rin in ((POLICY, NO_ROLLIN) if a else (GUIDE, NO_ROLLIN))
    if name in ("ppo", "ppo_pp"):
        assert not any(aggrevated)
    if name == "aggrevated":
        assert all(aggrevated)
    two_heads = name in ("lols", "d2lols")
    return aggrevated, [1 if (a and two_heads) else 0 for a in aggrevated]


def expected_advantages(rewards, values, policy_tokens, length, aggrevated, gamma, lam):
    """One sample, by the book. PPO and PPO++: GAE. AggreVaTeD: each rollin token of pi_theta gets A^{pi_g}(s_t, a_t):
    one step (r_t + gamma V(s_{t+1}) - V(s_t)) while the next token is pi_theta's, the last one bootstraps into the
    guide's lambda-return from s_h."""
    adv = [0.0] * (length + 1)
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        if aggrevated and policy_tokens[t]:
            adv[t] = delta if (t + 1 < length and policy_tokens[t + 1]) else delta + gamma * adv[t + 1]
        else:
            adv[t] = delta + gamma * lam * adv[t + 1]
    return adv[:length]


def whiten(values):
    x = torch.tensor(values, dtype=torch.float64)
    return ((x - x.mean()) / torch.sqrt(x.var() + 1e-8)).tolist() if len(values) > 1 else [0.0] * len(values)


def check_iteration(name, it, iteration, args, extra, logged):
    rollout = it["rollout"]
    response, mask, by_guide = rollout["response"], rollout["response_mask"], rollout["by_guide"]
    batch = len(response)
    old, ref = it["score_forwards"]
    assert old["head"] and not ref["head"] and old["model"] is not ref["model"]
    aggrevated, head = sample_kinds(name, rollout, iteration, extra)
    scores = rollout["scores"].double()

    # Score: the task reward at the last token, -lambda_kl (log pi_theta - log pi_0) on pi_theta's tokens only.
    per_sample, kl_total = [], 0.0
    for i in range(batch):
        length = int(mask[i].sum())
        policy_tokens = [bool(mask[i, t] and not by_guide[i, t]) for t in range(length)]
        kl = [
            (old["logprobs"][i, t] - ref["logprobs"][i, t]).item() if policy_tokens[t] else 0.0 for t in range(length)
        ]
        kl_total += sum(kl)
        rewards = [-args.kl_coef * k for k in kl]
        rewards[-1] += scores[i].item()
        values = [old["values"][i, t, head[i]].item() for t in range(length)]
        adv = expected_advantages(rewards, values, policy_tokens, length, aggrevated[i], args.gamma, args.gae_lambda)
        value_tokens = [bool(by_guide[i, t]) if aggrevated[i] else policy_tokens[t] for t in range(length)]
        per_sample.append(
            dict(
                length=length,
                policy=policy_tokens,
                value=value_tokens,
                adv=adv,
                returns=[a + v for a, v in zip(adv, values)],
                values=values,
            )
        )
    assert logged["train/kl"] == pytest.approx(kl_total / batch, rel=1e-5, abs=1e-7)
    assert logged["train/reward"] == pytest.approx(scores.mean().item(), rel=1e-6)

    # Whitening over the policy tokens: LOLS whitens each kind of sample apart; the others whiten the whole batch.
    groups = [[False, True]] if name != "lols" else [[False], [True]]
    whitened = {}
    for kinds in groups:
        keys = [
            (i, t)
            for i in range(batch)
            if aggrevated[i] in kinds
            for t in range(per_sample[i]["length"])
            if per_sample[i]["policy"][t]
        ]
        whitened.update(zip(keys, whiten([per_sample[i]["adv"][t] for i, t in keys])))
    weight = {False: 1.0, True: 1.0} if name != "lols" else {False: extra["alpha"], True: 1 - extra["alpha"]}

    # Update: per minibatch, the clipped policy loss, the clipped value loss and the MLE term, and their sum.
    steps = iter(it["steps"])
    sums = {"pg": [], "vf": [], "mle": []}
    clip_bound = value_clip_bound = False
    for perm in it["perms"]:
        for mb in perm.split(args.minibatch_size).__iter__():
            step = next(steps)
            new, mle = step["new"], step["mle"]
            assert torch.equal(new["response"], response[mb]) and torch.equal(mle["query"], rollout["query"][mb])
            pg_by_kind, vf = {False: [], True: []}, []
            for j, i in enumerate(mb.tolist()):
                s = per_sample[i]
                for t in range(s["length"]):
                    if s["policy"][t]:
                        ratio = math.exp(new["logprobs"][j, t].item() - old["logprobs"][i, t].item())
                        a = whitened[(i, t)]
                        clipped = min(max(ratio, 1 - args.clip_range), 1 + args.clip_range)
                        pg_by_kind[aggrevated[i]].append(max(-a * ratio, -a * clipped))
                        clip_bound |= -a * clipped > -a * ratio + 1e-9
                    if s["value"][t]:
                        v_new, v_old, ret = new["values"][j, t, head[i]].item(), s["values"][t], s["returns"][t]
                        v_clip = v_old + min(max(v_new - v_old, -args.vf_clip_range), args.vf_clip_range)
                        vf.append(max((v_new - ret) ** 2, (v_clip - ret) ** 2))
                        value_clip_bound |= (v_clip - ret) ** 2 > (v_new - ret) ** 2 + 1e-9
            mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
            kinds = set(weight) if name == "lols" else {False}
            pg = (
                sum(weight[k] * mean(pg_by_kind[k]) for k in kinds)
                if name == "lols"
                else mean(pg_by_kind[False] + pg_by_kind[True])
            )
            vf_loss = 0.5 * mean(vf)
            ref_mask = mle["response_mask"]
            mle_loss = -(mle["logprobs"] * ref_mask).sum().item() / ref_mask.sum().item()
            total = pg + args.vf_coef * vf_loss + args.mle_coef * mle_loss
            assert step["loss"] == pytest.approx(total, rel=1e-4, abs=1e-5), (name, iteration)
            sums["pg"].append(pg), sums["vf"].append(vf_loss), sums["mle"].append(mle_loss)
    for key, logged_key in (("pg", "loss/policy"), ("vf", "loss/value"), ("mle", "loss/mle")):
        assert logged[logged_key] == pytest.approx(sum(sums[key]) / len(sums[key]), rel=1e-4, abs=1e-5), (
            name,
            logged_key,
        )
    return clip_bound, value_clip_bound


@pytest.mark.parametrize("case", list(CASES))
def test_objective_by_hand(tiny, tmp_path, recorder, case):
    name, extra = CASES[case]
    run_dir, metrics = run(name, tiny, tmp_path, num_iterations=2, **{**SETTINGS, **extra})
    with open(os.path.join(run_dir, "args.json")) as f:
        args = type("Args", (), json.load(f))
    recorded = iterations(recorder)
    assert len(recorded) == 2
    bound = [check_iteration(name, it, i + 1, args, extra, metrics[i + 1]) for i, it in enumerate(recorded)]
    assert any(b[0] for b in bound) and any(b[1] for b in bound)  # both clips were binding: the check saw them
    if case == "aggrevated-variable-length":  # pi_theta's own EOS is an action AggreVaTeD scores: h = L, no rollout
        stopped = [
            (
                (r["rollout"]["restart_at"] == r["rollout"]["response_mask"].sum(1))
                & (r["rollout"]["rollin_by"] == POLICY)
            ).any()
            for r in recorded
        ]
        assert any(stopped)


@pytest.mark.parametrize("name", ["ppo", "ppo_pp", "aggrevated", "lols", "d2lols"])
def test_reward_rises_on_a_tiny_task(tiny, tmp_path, monkeypatch, name):
    """The reward is the share of positive words; the guide (constant_guide) writes only positive words. Every script
    must raise the policy's own validation reward within a few iterations (a flipped sign makes it fall)."""
    import tasks
    from conftest import PositiveWords

    events = []
    monkeypatch.setattr(tasks, "load_reward", lambda *args: PositiveWords(events))
    extra = {"ppo_pp": dict(beta=0.5), "d2lols": dict(alpha=3)}.get(name, {})
    _, metrics = run(name, tiny, tmp_path, **{**LEARNING, **extra})
    assert events  # the script scored with PositiveWords: the patch took effect
    rewards = [m["eval/reward"] for m in metrics if "eval/reward" in m]
    assert all(math.isfinite(v) for m in metrics for v in m.values() if isinstance(v, float))
    # AggreVaTeD learns slower here: its early rollin tokens wait for the critic V^{pi_g} (one-step advantages)
    assert rewards[-1] > rewards[0] + (0.03 if name in ("aggrevated", "lols") else 0.15), rewards


LEARNING = dict(
    num_iterations=8,
    rollouts_per_iteration=16,
    minibatch_size=8,
    ppo_epochs=2,
    learning_rate=1e-2,
    vf_learning_rate=3e-2,
    eval_every=0,
    eval_size=16,
    guide_name="conftest:constant_guide",
    beta=0.0,
)


@pytest.mark.parametrize("case", ["ppo", "ppo_pp", "aggrevated", "lols", "d2lols"])
def test_first_minibatch_ratio_is_exactly_one(tiny, tmp_path, recorder, case):
    """The first minibatch of each iteration sees the weights that scored the rollout: its log-probs equal the old ones
    bit for bit (ratio 1, approx_kl 0), with and without restarts (PPO++ with beta = 1: every sample has a prefix)."""
    name, extra = CASES[case]
    extra = dict(beta=1.0) if case == "ppo_pp" else extra
    run(name, tiny, tmp_path, num_iterations=2, **{**SETTINGS, **extra})
    for it in iterations(recorder):
        first = it["perms"][0][: SETTINGS["minibatch_size"]]
        old, new = it["score_forwards"][0]["logprobs"][first], it["steps"][0]["new"]["logprobs"]
        mask = it["rollout"]["response_mask"][first]
        assert torch.equal(new[mask], old[mask])
        if case == "ppo_pp":
            assert (it["rollout"]["restart_at"][first] > 0).all()


@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5"])
def test_forward_matches_a_full_vocabulary_pass_values_and_gradients(tiny, kind):
    """common.forward computes the logits of the response positions only (logits_to_keep) and log pi(a_t) as
    logit - logsumexp: its log-probs and their gradients equal those of a plain pass that computes every position's
    logits and a full log_softmax (the objective is untouched by the savings)."""
    import common
    from plumbing import models
    from test_common import _tiny_llama

    model = {
        "gpt2": lambda: models.load_lm(tiny["lm"], "cpu"),
        "llama": _tiny_llama,
        "t5": lambda: models.load_lm(tiny["t5"], "cpu"),
    }[kind]()
    g = torch.Generator().manual_seed(0)
    query, response = torch.randint(2, 30, (3, 6), generator=g), torch.randint(2, 30, (3, 5), generator=g)
    query_mask = torch.ones_like(query, dtype=torch.bool)
    query_mask[0, :2] = False  # left padding
    response_mask = torch.ones_like(response, dtype=torch.bool)
    response_mask[1, 3:] = False
    weights = torch.randn(3, 5, generator=g)

    def plain():
        inputs, start = common._inputs(model.config, query, query_mask, response, response_mask)
        logits = model(**inputs).logits[:, start : start + response.shape[1]].float()
        return logits.log_softmax(-1).gather(2, response[..., None]).squeeze(-1)

    out = []
    for fn in (plain, lambda: common.forward(model, None, query, query_mask, response, response_mask)[0]):
        model.zero_grad()
        logprobs = fn()
        (logprobs * weights * response_mask).sum().backward()
        out.append((logprobs.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-6)
    assert len(out[0][1]) == len(out[1][1])
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["ppo", "grpo"])
def test_a_term_at_coefficient_zero_costs_no_pass(tiny, tmp_path, recorder, name):
    """--kl-coef 0: no forward pass of the reference during training (train/kl is then not measured: null);
    --mle-coef 0: no pass over the references. With both above 0 both passes run every iteration."""
    counted = {}
    for kl_coef, mle_coef in ((0.0, 0.0), (0.3, 0.7)):
        recorder.clear()
        flags = dict(num_iterations=2, eval_every=0, kl_coef=kl_coef, mle_coef=mle_coef)
        _, metrics = run(name, tiny, tmp_path / f"{kl_coef}", **flags)
        rollouts = [e["response"] for kind, e in recorder if kind == "rollout"]

        def of_a_rollout(pass_):  # every row of the pass is a row of a rollout's responses
            rows = {tuple(r) for rollout in rollouts for r in rollout.tolist()}
            return all(tuple(r) in rows for r in pass_["response"].tolist())

        passes = [e for kind, e in recorder if kind == "forward"]
        policy = next(p["model"] for p in passes if p["grad"])  # an update's pass
        reference = [p for p in passes if not p["grad"] and p["model"] is not policy and of_a_rollout(p)]
        mle = [p for p in passes if p["grad"] and not of_a_rollout(p)]  # over the dataset's references
        counted[kl_coef] = (len(reference), len(mle))
        assert (metrics[1]["train/kl"] is None) == (kl_coef == 0)
    # 2 iterations; the tiny runs' 8 episodes in minibatches of 4, 2 epochs: 8 steps, each with its MLE pass
    assert counted[0.0] == (0, 0) and counted[0.3] == (2, 8)


def test_without_kl_evaluation_or_guide_no_frozen_copy_is_kept(tiny, tmp_path, monkeypatch):
    """--kl-coef 0 --eval-size 0 (full fine-tuning, no guide): no frozen copy of the starting model is made (nothing
    would read it) and no evaluation row is logged; with --eval-size 1 the copy is back (eval/kl reads it)."""
    from plumbing import models

    loaded, load = [], models.load_reference_and_policy
    monkeypatch.setattr(models, "load_reference_and_policy", lambda *a: loaded.append(load(*a)) or loaded[-1])
    _, rows = run("grpo", tiny, tmp_path / "none", num_iterations=1, kl_coef=0.0, eval_size=0)
    assert loaded[-1][0] is None and all("eval/reward" not in r for r in rows) and [r["iteration"] for r in rows] == [1]
    _, rows = run("grpo", tiny, tmp_path / "one", num_iterations=1, kl_coef=0.0, eval_size=1)
    assert loaded[-1][0] is not None and "eval/kl" in rows[-1]
