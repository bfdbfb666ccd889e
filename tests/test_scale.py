"""Scale (issue: bf16, LoRA, accumulation, accelerate): what runs on a CPU in CI."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import run


@pytest.mark.parametrize("name", ["ppo_pp", "d2lols"])
def test_bf16_is_mixed_precision_end_to_end(tiny, tmp_path, monkeypatch, name):
    """--dtype bfloat16 (here on the CPU): the policy keeps fp32 weights, AdamW state and checkpoint and computes under
    autocast (its lm_head writes bf16); reference, guide and eval LM are stored in bf16; log-probs and values reach the
    losses in fp32; the run trains and logs finite numbers."""
    import common

    seen = {"head_dtypes": set(), "logprobs": set(), "values": set()}
    load, forward = common.load_reference_and_policy, common.forward

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

    monkeypatch.setattr(common, "load_reference_and_policy", load_spy)
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
    import common

    assert common.dtype_of("auto", torch.device("cpu")) == torch.float32
    assert common.dtype_of("auto", torch.device("cuda")) == torch.bfloat16
    assert common.dtype_of("float32", torch.device("cuda")) == torch.float32


@pytest.mark.parametrize("name", ["ppo", "ppo_pp", "aggrevated", "lols", "d2lols"])
def test_gradient_accumulation_is_the_whole_minibatch(tiny, tmp_path, name):
    """One iteration, one minibatch step of 8 episodes: 4 micro-batches of 2 give the same logged losses and the same
    weights after the optimizer step as one pass over the 8 (policy, value and MLE terms; LOLS's two kinds)."""
    flags = dict(num_iterations=1, ppo_epochs=1, minibatch_size=8, eval_every=0, eval_size=4, beta=0.5, alpha=0.5 if name == "lols" else 1)
    one_dir, one = run(name, tiny, tmp_path / "k1", **flags)
    four_dir, four = run(name, tiny, tmp_path / "k4", gradient_accumulation_steps=4, **flags)
    for key in ("loss/policy", "loss/value", "loss/mle", "policy/clipfrac", "policy/approx_kl", "grad_norm", "train/reward"):
        assert four[1][key] == pytest.approx(one[1][key], rel=1e-5, abs=1e-7), key
    a, b = (load_file(os.path.join(d, "checkpoint", "model.safetensors")) for d in (one_dir, four_dir))
    start = load_file(os.path.join(tiny["lm"], "model.safetensors"))
    assert any(not torch.equal(a[k], start[k]) for k in a if k in start)  # the step moved the weights
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
