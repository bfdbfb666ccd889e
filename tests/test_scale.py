"""Scale (issue: bf16, LoRA, accumulation, accelerate): what runs on a CPU in CI."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import run
from plumbing import UserError, models


@pytest.mark.parametrize("name", ["ppo_pp", "d2lols"])
def test_bf16_is_mixed_precision_end_to_end(tiny, tmp_path, monkeypatch, name):
    """--dtype bfloat16 (here on the CPU): the policy keeps fp32 weights, AdamW state and checkpoint and computes under
    autocast (its lm_head writes bf16); reference, guide and eval LM are stored in bf16; log-probs and values reach the
    losses in fp32; the run trains and logs finite numbers."""
    import common

    seen = {"head_dtypes": set(), "logprobs": set(), "values": set()}
    load, forward = models.load_reference_and_policy, common.forward

    def load_spy(*args, **kwargs):
        reference, policy = load(*args, **kwargs)
        seen["reference"], seen["policy"] = reference, policy
        policy.get_output_embeddings().register_forward_hook(lambda m, i, out: seen["head_dtypes"].add(out.dtype))
        return reference, policy

    def forward_spy(model, value_head, *args, **kwargs):
        out = forward(model, value_head, *args, **kwargs)
        seen["logprobs"].add(out[0].dtype)
        if out[1] is not None:
            seen["values"].add(out[1].dtype)
        return out

    monkeypatch.setattr(models, "load_reference_and_policy", load_spy)
    monkeypatch.setattr(common, "forward", forward_spy)
    extra = {"alpha": 1} if name == "d2lols" else {}
    run_dir, metrics = run(name, tiny, tmp_path, num_iterations=2, dtype="bfloat16", save_every=1, **extra)
    assert all(p.dtype == torch.bfloat16 for p in seen["reference"].parameters())
    assert all(p.dtype == torch.float32 for p in seen["policy"].parameters())
    assert seen["head_dtypes"] == {torch.bfloat16} and seen["logprobs"] == seen["values"] == {torch.float32}
    assert all(v is None or not isinstance(v, float) or v == v for m in metrics for v in m.values())
    assert metrics[-1]["train/kl"] != 0 and metrics[1]["grad_norm"] > 0
    with safe_open(os.path.join(run_dir, "checkpoint", "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    state = torch.load(os.path.join(run_dir, "checkpoint", "training_state.pt"), weights_only=True)
    assert {v["exp_avg"].dtype for v in state["optimizer"]["state"].values()} == {torch.float32}
    assert json.load(open(os.path.join(run_dir, "args.json")))["dtype"] == "bfloat16"


def test_dtype_auto_is_float32_on_the_cpu():

    assert models.dtype_of("auto", torch.device("cpu")) == torch.float32
    assert models.dtype_of("auto", torch.device("cuda")) == torch.bfloat16
    assert models.dtype_of("float32", torch.device("cuda")) == torch.float32


@pytest.mark.parametrize("name", ["ppo", "ppo_pp", "aggrevated", "lols", "d2lols"])
def test_gradient_accumulation_is_the_whole_minibatch(tiny, tmp_path, name):
    """One iteration, one minibatch step of 8 episodes: 4 micro-batches of 2 give the same logged losses and the same
    weights after the optimizer step as one pass over the 8 (policy, value and MLE terms; LOLS's two kinds)."""
    flags = dict(
        num_iterations=1,
        ppo_epochs=1,
        minibatch_size=8,
        eval_every=0,
        eval_size=4,
        beta=0.5,
        alpha=0.5 if name == "lols" else 1,
    )
    one_dir, one = run(name, tiny, tmp_path / "k1", **flags)
    four_dir, four = run(name, tiny, tmp_path / "k4", gradient_accumulation_steps=4, **flags)
    for key in (
        "loss/policy",
        "loss/value",
        "loss/mle",
        "policy/clipfrac",
        "policy/approx_kl",
        "grad_norm",
        "train/reward",
    ):
        assert four[1][key] == pytest.approx(one[1][key], rel=1e-5, abs=1e-7), key
    a, b = (load_file(os.path.join(d, "checkpoint", "model.safetensors")) for d in (one_dir, four_dir))
    start = load_file(os.path.join(tiny["lm"], "model.safetensors"))
    assert any(not torch.equal(a[k], start[k]) for k in a if k in start)  # the step moved the weights
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def spy_models(monkeypatch):

    seen = {}
    load, guide = models.load_reference_and_policy, models.load_guide

    def load_spy(*args, **kwargs):
        seen["reference"], seen["policy"] = load(*args, **kwargs)
        return seen["reference"], seen["policy"]

    def guide_spy(*args, **kwargs):
        sample, seen["guide"] = guide(*args, **kwargs)
        return sample, seen["guide"]

    monkeypatch.setattr(models, "load_reference_and_policy", load_spy)
    monkeypatch.setattr(models, "load_guide", guide_spy)
    return seen


def test_lora_trains_adapters_on_one_copy_of_the_base(tiny, tmp_path, monkeypatch):
    """--lora-r 4: only the adapters train; the KL reference and the guide (same checkpoint) are the policy's own base
    with the adapters off, so one copy of the base weights exists, and after training they still compute exactly
    what a freshly loaded base model computes."""

    seen = spy_models(monkeypatch)
    run_dir, metrics = run("ppo_pp", tiny, tmp_path, num_iterations=2, beta=0.5, lora_r=4, lora_alpha=8, save_every=1)
    policy, reference = seen["policy"], seen["reference"]
    assert seen["guide"] is reference and reference.model is policy
    trained = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert any(p.abs().sum() > 0 for n, p in policy.named_parameters() if "lora_B" in n)  # B starts at zero: it moved
    fresh = models.load_lm(tiny["lm"], torch.device("cpu"))
    base = [p for n, p in policy.named_parameters() if "lora_" not in n]
    assert sum(p.numel() for p in base) == sum(
        p.numel() for p in fresh.parameters()
    )  # the base, once, and nothing else
    ids = torch.randint(3, 30, (2, 7))
    with torch.no_grad():
        assert torch.equal(reference(input_ids=ids).logits, fresh(input_ids=ids).logits)
        assert not torch.equal(policy(input_ids=ids).logits, fresh(input_ids=ids).logits)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(os.path.join(run_dir, "checkpoint")))
    assert metrics[-1]["train/kl"] != 0 and all(v == v for m in metrics for v in m.values() if isinstance(v, float))


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_lora_resume_continues_exactly(tiny, tmp_path, monkeypatch, critic):
    """Stopped after a checkpoint and resumed, a LoRA run gives the same rows and adapters as one run straight through
    (the separate critic's adapter included)."""
    from conftest import stopped_then_resumed

    flags = dict(num_iterations=3, lora_r=4, lora_alpha=8, save_every=1, lr_schedule="linear", critic=critic)
    straight_dir, straight, run_dir, resumed = stopped_then_resumed("ppo", tiny, tmp_path, monkeypatch, **flags)
    drop = lambda row: {k: v for k, v in row.items() if not k.startswith("time/")}  # noqa: E731
    assert [drop(r) for r in resumed] == [drop(r) for r in straight]
    for adapter in ["adapter_model.safetensors"] + (
        ["critic/adapter_model.safetensors"] if critic == "separate" else []
    ):
        a, b = (load_file(os.path.join(d, "checkpoint", adapter)) for d in (straight_dir, run_dir))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_separate_critic_is_a_second_adapter_whose_gradients_never_reach_the_policy(tiny):
    """--critic separate under LoRA: a second adapter ("critic") on the same base weights, no copy of the model. The
    value loss's gradient reaches only the critic's adapter and head; the policy loss's only the policy's adapter;
    both adapters stay trainable, and the KL reference (adapters off) is the base."""
    import types

    import common

    args = types.SimpleNamespace(
        model_name=tiny["lm"], lora_r=4, lora_alpha=8.0, lora_dropout=0.0, critic="separate", resume=None
    )
    reference, policy = models.load_reference_and_policy(args, torch.device("cpu"))
    base = models.load_lm(tiny["lm"], "cpu")
    assert sum(p.numel() for p in policy.parameters() if not p.requires_grad) == sum(
        p.numel() for p in base.parameters()
    )
    value_head = common.value_head(policy, 1, torch.device("cpu"))
    torch.nn.init.normal_(value_head.weight)  # zero-initialised heads pass no gradient to their trunk
    for p in policy.parameters():  # adapters away from their zero start, so that each path has a gradient
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    g = torch.Generator().manual_seed(0)
    query, response = torch.randint(2, 20, (3, 5), generator=g), torch.randint(2, 20, (3, 4), generator=g)
    ones = lambda x: torch.ones_like(x, dtype=torch.bool)  # noqa: E731
    common.forward(reference, None, query, ones(query), response, ones(response))  # peft's switching off and on again
    logprobs, values = common.forward(policy, value_head, query, ones(query), response, ones(response))
    trained = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert any(".critic." in n for n in trained) and any(".default." in n for n in trained)
    assert all(".critic." in n or ".default." in n for n in trained)

    def grads(kind):
        return [
            p.grad.abs().sum().item() if p.grad is not None else 0.0 for n, p in trained.items() if f".{kind}." in n
        ]

    values.sum().backward(retain_graph=True)
    assert sum(grads("default")) == 0 and sum(grads("critic")) > 0 and value_head.weight.grad.abs().sum() > 0
    policy.zero_grad()
    logprobs.sum().backward()
    assert sum(grads("critic")) == 0 and sum(grads("default")) > 0
    with torch.no_grad():
        expected = base(input_ids=query).logits
        assert torch.allclose(reference(input_ids=query).logits, expected, atol=1e-5)
    with pytest.raises(UserError, match="--critic separate needs --lora-r > 0"):
        models.load_reference_and_policy(types.SimpleNamespace(**{**vars(args), "lora_r": 0}), torch.device("cpu"))


def test_sft_with_lora_feeds_an_rl_run_with_lora(tiny, tmp_path):
    """sft.py --lora-r writes an adapter checkpoint; as --model-name it loads as the base with the adapter merged in
    (the RL run's iteration-0 perplexity is sft's final one), and the RL run puts its own adapters on top."""
    sft_dir, sft = run(
        "sft", tiny, tmp_path / "sft", num_epochs=1.0, batch_size=8, lora_r=4, lora_alpha=32, learning_rate=1e-2
    )
    checkpoint = os.path.join(sft_dir, "checkpoint")
    assert os.path.isfile(os.path.join(checkpoint, "adapter_model.safetensors"))
    assert sft[-1]["eval/perplexity"] < sft[0]["eval/perplexity"]
    _, metrics = run("ppo", tiny, tmp_path / "rl", num_iterations=1, model_name=checkpoint, lora_r=4)
    assert metrics[0]["eval/perplexity"] == pytest.approx(sft[-1]["eval/perplexity"], rel=1e-4)
