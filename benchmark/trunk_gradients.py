"""Where the gradient into pi_theta's own weights comes from. The value head sits on the policy's last hidden state, so
the value loss (times vf_coef) trains the policy's trunk too; this prints, per term of the loss, the norm of the
gradient it sends into the policy's weights (the value head excluded): the median over a run's minibatch steps and
the last step's (a zero-initialised head sends nothing at first; its share grows as the head's weights do).

    python benchmark/trunk_gradients.py -- --task concepts --vf-coef 30 --num-iterations 2
    python benchmark/trunk_gradients.py --script aggrevated -- --task concepts --vf-coef 0.5

Flags after -- go to the script (ppo, ppo_pp, aggrevated or d2lols: the scripts whose loss is policy + value + MLE).
Each term's gradient is taken apart with torch.autograd.grad before the script's own backward; training is unchanged."""

import importlib
import math
import os
import statistics
import sys
from dataclasses import dataclass

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import tasks  # noqa: E402
from plumbing import check, runs  # noqa: E402


@dataclass
class Args:
    script: str = "ppo"
    """ppo, ppo_pp, aggrevated or d2lols"""


def main(args, extra):
    check(
        args.script in ("ppo", "ppo_pp", "aggrevated", "d2lols"),
        f"--script: one of ppo, ppo_pp, aggrevated, d2lols, not {args.script}",
    )
    module = importlib.import_module(args.script)
    script_args = runs.parse(module.Args, extra, tasks.defaults)
    terms, seen, norms = [], {}, {"policy loss": [], "value loss x vf_coef": [], "MLE x mle_coef": [], "all terms": []}
    mean, forward, backward = common.masked_mean, common.forward, torch.Tensor.backward

    def mean_spy(x, mask, *whole):  # the three terms of the loss, in order: policy, value, MLE
        out = mean(x, mask, *whole)
        if torch.is_grad_enabled() and x.requires_grad:
            terms.append(out)
        return out

    def forward_spy(model, value_head, *a, **k):
        if value_head is not None:
            seen["policy"] = model
        return forward(model, value_head, *a, **k)

    def backward_spy(loss, *a, **k):
        pg, vf, mle = terms[-3:]
        weights = [p for p in seen["policy"].parameters() if p.requires_grad]
        parts = {
            "policy loss": pg,
            "value loss x vf_coef": script_args.vf_coef * 0.5 * vf,
            "MLE x mle_coef": script_args.mle_coef * -mle,
            "all terms": loss,
        }
        for name, term in parts.items():
            grads = torch.autograd.grad(term, weights, retain_graph=True, allow_unused=True)
            norms[name].append(math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None)))
        terms.clear()
        return backward(loss, *a, **k)

    common.masked_mean, common.forward, torch.Tensor.backward = mean_spy, forward_spy, backward_spy
    try:
        module.main(script_args)
    finally:
        common.masked_mean, common.forward, torch.Tensor.backward = mean, forward, backward
    steps = len(norms["all terms"])
    print(
        f"gradient norm into the policy's weights (not the value head) over {steps} minibatch steps; "
        f"vf_coef {script_args.vf_coef}, max_grad_norm {script_args.max_grad_norm}"
    )
    print(f"{'term':<22} {'median':>10} {'last step':>10}   median / the policy loss's")
    base = statistics.median(norms["policy loss"])
    for name, values in norms.items():
        print(
            f"{name:<22} {statistics.median(values):>10.4f} {values[-1]:>10.4f}   "
            f"{statistics.median(values) / base:>8.2f}x"
        )


if __name__ == "__main__":
    split = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    main(tyro.cli(Args, args=sys.argv[1:split]), sys.argv[split + 1 :])
