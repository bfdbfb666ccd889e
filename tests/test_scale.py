"""Scale (issue: bf16, LoRA, accumulation, accelerate): what runs on a CPU in CI."""

import json
import os

import pytest
import torch
from safetensors import safe_open

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
