"""Supervised fine-tuning, the paper's starting point: maximum likelihood of the task's references given their prompts,
on the positive reviews (sentiment tasks) or on every training pair (concept-to-sentence tasks), one epoch by default.
The checkpoint it writes is what --model-name and --guide-name of the RL scripts take."""

import os
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch

import common
import runs
import tasks


@dataclass
class Args:
    """Flags at None take the task's preset (tasks/sentiment.py, tasks/commongen.py, tasks/summarize.py); a flag you pass always wins."""

    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    task: tasks.Name = "rotten-tomatoes"
    """rotten-tomatoes (the default) and concepts run offline; imdb, commongen and tldr (the paper's) need the hub or local copies"""
    seed: int = 1
    """seed of the experiment"""
    device: str = "auto"
    """cuda if available, else cpu; or any torch device"""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: bfloat16 on CUDA (mixed precision: fp32 weights of the trained model, bf16 frozen models), float32 elsewhere"""
    fast_decoding: bool = False
    """CUDA, causal LMs: sampling over a static KV cache with a compiled one-token step (not yet measured on a GPU: off by default)"""
    output_dir: str = "runs"
    """the checkpoint goes to {output_dir}/{task}__sft__{seed}__{time}/checkpoint"""
    num_epochs: float = 1.0
    """passes over the positive training texts (fractions allowed)"""
    batch_size: int = 16
    """texts per gradient step"""
    sft_learning_rate: float = 5e-5
    """AdamW learning rate, linear decay to 0"""
    track: bool = False
    """log to Weights & Biases (needs wandb)"""
    tensorboard: bool = False
    """also write TensorBoard event files (needs tensorboard)"""
    resume: Optional[str] = None
    """not supported by sft.py (short runs); must stay None"""

    # Task and models (None: the task's preset in tasks/)
    dataset_name: Optional[str] = None
    """hub name or local directory of the dataset"""
    model_name: Optional[str] = None
    """the model to fine-tune: hub name, local directory or smollm2-135m"""
    lora_r: Optional[int] = None
    """LoRA rank (peft) on every linear layer of the blocks; 0: full fine-tuning (the preset of every task but tldr's 8)"""
    lora_alpha: Optional[float] = None
    """LoRA scale alpha (the update is alpha / r x BA)"""
    lora_dropout: Optional[float] = None
    """LoRA dropout (0: old and new log-probs must come from the same function; the paper's TL;DR had 0.1)"""
    reward_model_name: Optional[str] = None
    """the task reward used for the before/after evaluation (as in the RL scripts)"""
    eval_lm_name: Optional[str] = None
    """the fixed general LM that measures output perplexity"""
    prompt_len: Optional[int] = None
    """prompt tokens kept (evaluation)"""
    truncation_side: Optional[str] = None
    """which side of a long prompt is cut: left or right"""
    max_new_tokens: Optional[int] = None
    """response length in the evaluation"""
    min_new_tokens: Optional[int] = None
    """no EOS before this many tokens in the evaluation"""
    top_k: Optional[int] = None
    """top-k of the evaluation's sampling"""
    top_p: Optional[float] = None
    """nucleus mass of the evaluation's sampling"""
    eval_num_beams: Optional[int] = None
    """beam search width of the evaluation (1: sampling)"""
    eval_best_of: int = 1
    """Best-of-N evaluation: N samples per prompt, the reward keeps the best one (1: off)"""
    eval_judge: Optional[str] = None
    """tldr: the LLM judging the win rate against the references (hub name, local directory, or openai:MODEL at $OPENAI_BASE_URL)"""
    eval_judge_prompt: Optional[str] = None
    """the judge's prompt: a text file with {post}, {summary_a} and {summary_b}"""
    eval_size: Optional[int] = None
    """prompts per evaluation"""
    eval_split: Literal["validation", "test"] = "validation"
    """the split evaluations use: validation during training, test for a final report"""


def main(args):
    common.check(args.resume is None, "sft.py has no --resume")
    common.check(common.processes()[1] == 1, "sft.py runs in one process: start it with python, not accelerate launch")
    common.check(args.num_epochs > 0 and args.batch_size >= 1, "--num-epochs and --batch-size must be positive")
    tasks.fill_from_preset(args)
    tasks.require_assets(args, ["dataset_name", "model_name", "reward_model_name", "eval_lm_name"])
    path = runs.run_dir(args)
    common.seed_everything(args.seed)
    device = common.device_of(args.device)
    dtype = common.dtype_of(args.dtype, device)

    tokenizer = common.load_tokenizer(args.model_name)
    data, reward_data = tasks.load_data(args, tokenizer)
    reward_fn = tasks.load_reward(args, data, reward_data, device)
    policy = common.load_lm(args.model_name, device, dtype if args.lora_r else torch.float32)
    policy = common.mixed_precision(common.lora(policy, args) if args.lora_r else policy, dtype)
    eval_lm = common.frozen(common.load_lm(args.eval_lm_name, device, dtype))
    sampler = common.sampler(policy, tokenizer, args.top_k, args.top_p, num_beams=args.eval_num_beams)
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
    bar = common.progress(steps, 0, "sft")
    for step in range(1, steps + 1):
        start = time.time()
        batch = [pairs[i] for i in order[(step - 1) * args.batch_size : step * args.batch_size].tolist()]
        query, query_mask = common.tokenize_prompts(tokenizer, [p for p, _ in batch], args.prompt_len, args.truncation_side, device)
        reference, reference_mask = common.tokenize_responses(tokenizer, [r for _, r in batch], args.max_new_tokens, device)
        logprobs, _ = common.forward(policy, None, query, query_mask, reference, reference_mask)
        loss = -common.masked_mean(logprobs, reference_mask)
        optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        runs.check_finite(step, mle_loss=loss, grad_norm=grad_norm)
        optimizer.step()
        scheduler.step()
        logger.log({"iteration": step, "episodes": step * args.batch_size, "loss/mle": loss.item(),
                    "lr": scheduler.get_last_lr()[0], "time/iteration_s": time.time() - start})
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()

    metrics, samples = evaluate()
    logger.log({"iteration": steps, "episodes": steps * args.batch_size, **metrics}, samples)
    print(f"after SFT: {metrics}")
    common.save_checkpoint_model(policy, tokenizer, os.path.join(path, "checkpoint.tmp"))
    os.replace(os.path.join(path, "checkpoint.tmp"), os.path.join(path, "checkpoint"))  # there whole, or not at all
    logger.close()
    print(f"done: {os.path.join(path, 'checkpoint')}  (pass it as --model-name)")


if __name__ == "__main__":
    runs.cli(main, Args)
