"""The final evaluation of one model, the same for every row of benchmark/study.py's table: common.evaluate on the first
--final-eval-size prompts of --eval-split (0: the whole split), sampled under --seed, with --reference (the SFT
checkpoint, pi_0 of every RL run) as the KL reference of eval/kl. The other flags are ppo.py's, filled from the task's
preset as in the runs (prompt_len, max_new_tokens, top_k, top_p, eval_num_beams, ...).

    python benchmark/final_eval.py --task imdb --model-name RUN/checkpoint --reference SFT/checkpoint --out
    RUN/final_eval.json
    python benchmark/final_eval.py ... --model-name SFT/checkpoint --guide   # sampled as the guide: --top-k,
    --guide-top-p

Writes --out: the metrics, a few samples, and what makes rows comparable (split, prompt count, a hash of the prompts,
seed)."""

import hashlib
import json
import os
import sys
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import ppo  # noqa: E402
import tasks  # noqa: E402
from plumbing import check, decoding, models, parallel, runs  # noqa: E402


@dataclass
class Args(ppo.Args):
    """ppo.py's flags (--seed: the sampling seed of the evaluation; --model-name: the model evaluated) and these."""

    reference: str = ""
    """the KL reference pi_0 of eval/kl (the study: the SFT checkpoint)"""
    guide: bool = False
    """sample as the RLGF scripts' guide does (--top-k and --guide-top-p, no beam search) instead of as the policy"""
    guide_top_p: float = 0.92
    """nucleus mass of the guide's sampling"""
    final_eval_size: int = 0
    """the first this many prompts of --eval-split (0: all of them)"""
    out: str = "final_eval.json"
    """where the result goes (JSON)"""


def main(args):
    check(args.reference and args.final_eval_size >= 0, "--reference is needed, and --final-eval-size must be >= 0")
    models.require_assets(args, ["dataset_name", "model_name", "reward_model_name", "eval_lm_name"])
    device = parallel.device_of(args.device)
    dtype = models.dtype_of(args.dtype, device)

    tokenizer = models.load_tokenizer(args.model_name)
    data, reward_data = tasks.load_data(args, tokenizer)
    reward_fn = tasks.load_reward(args, data, reward_data, device)
    pairs = data[args.eval_split][: args.final_eval_size or None]
    # The model as a run holds its policy (fp32 weights under autocast; a LoRA base in `dtype`), the frozen models in
    # `dtype`. Evaluating the reference itself (the SFT rows) gives eval/kl = 0.
    model = models.mixed_precision(
        models.frozen(models.load_lm(args.model_name, device, dtype if args.lora_r else torch.float32)), dtype
    )
    frozen_lms = {}
    reference = (
        model if args.reference == args.model_name else models.load_frozen_lm(args.reference, frozen_lms, device, dtype)
    )
    eval_lm = models.load_frozen_lm(args.eval_lm_name, frozen_lms, device, dtype)
    if args.guide:  # as ppo_pp.py and the others sample their guide (and evaluate it at iteration 0)
        generate = decoding.sampler(model, tokenizer, args.top_k, args.guide_top_p)
    else:  # as every script evaluates its policy
        generate = decoding.sampler(model, tokenizer, args.top_k, args.top_p, num_beams=args.eval_num_beams)
    metrics, samples = common.evaluate(
        generate, model, eval_lm, tokenizer, reward_fn, pairs, args, device, args.seed, reference
    )

    result = dict(
        model=args.model_name,
        reference=args.reference,
        sampling="guide" if args.guide else "policy",
        split=args.eval_split,
        final_eval_size=args.final_eval_size,
        prompts=len(pairs),
        prompts_sha256=hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16],
        seed=args.seed,
        metrics=metrics,
        samples=samples,
    )
    with open(args.out + ".tmp", "w") as f:  # written whole, then renamed: a cut-short file is never reused
        json.dump(result, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"{args.model_name}: {metrics}")


if __name__ == "__main__":
    runs.cli(main, Args, tasks.defaults)
