"""GRPO (Shao et al., 2024, arXiv 2402.03300): ppo.py without the critic. Each prompt gets a group of G samples, and a
sample's advantage is its reward against its group's mean (and std); every token is sampled by pi_theta."""

import os
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch

import common
import runs
import tasks
from common import NO_ROLLIN, POLICY


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
    """runs are written to {output_dir}/{task}__{exp_name}__{seed}__{time}"""
    resume: Optional[str] = None
    """a run directory to continue from its last checkpoint"""
    track: bool = False
    """log to Weights & Biases (needs wandb)"""
    tensorboard: bool = False
    """also write TensorBoard event files (needs tensorboard)"""

    # Task and models (None: the task's preset in tasks/)
    dataset_name: Optional[str] = None
    """hub name or local directory of the dataset"""
    model_name: Optional[str] = None
    """the starting policy pi_0 (also the frozen KL reference): hub name, local directory or smollm2-135m"""
    lora_r: Optional[int] = None
    """LoRA rank (peft) on every linear layer of the blocks; 0: full fine-tuning (the preset of every task but tldr's 8)"""
    lora_alpha: Optional[float] = None
    """LoRA scale alpha (the update is alpha / r x BA)"""
    lora_dropout: Optional[float] = None
    """LoRA dropout (0: old and new log-probs must come from the same function; the paper's TL;DR had 0.1)"""
    reward_model_name: Optional[str] = None
    """the task reward: a classifier (hub name, local directory), bow-logreg, cider-d, or a reward_model.py checkpoint"""
    eval_lm_name: Optional[str] = None
    """the fixed general LM that measures output perplexity"""
    prompt_len: Optional[int] = None
    """prompt tokens kept"""
    truncation_side: Optional[str] = None
    """which side of a long prompt is cut: left or right"""
    max_new_tokens: Optional[int] = None
    """response length budget N"""
    min_new_tokens: Optional[int] = None
    """no EOS before this many tokens (= max_new_tokens: fixed-length responses)"""
    top_k: Optional[int] = None
    """top-k of pi_theta's sampling (0: off)"""
    top_p: Optional[float] = None
    """nucleus mass of pi_theta's sampling (1: off)"""
    eval_num_beams: Optional[int] = None
    """beam search width of the evaluation (1: sample as in training)"""
    eval_best_of: int = 1
    """Best-of-N evaluation: N samples per prompt, the reward keeps the best one (1: off)"""
    eval_judge: Optional[str] = None
    """tldr: the LLM judging the win rate against the references (hub name, local directory, or openai:MODEL at $OPENAI_BASE_URL)"""
    eval_judge_prompt: Optional[str] = None
    """the judge's prompt: a text file with {post}, {summary_a} and {summary_b}"""

    # GRPO (None: the task's preset in tasks/)
    num_iterations: Optional[int] = None
    """collect-then-update iterations"""
    rollouts_per_iteration: Optional[int] = None
    """episodes collected per iteration: rollouts_per_iteration / group_size prompts, group_size samples each"""
    group_size: int = 4
    """G: samples per prompt, the group whose mean is each sample's baseline"""
    scale_rewards: bool = True
    """divide by the group's std (GRPO); --no-scale-rewards: the reward minus the group's mean only (Dr. GRPO)"""
    minibatch_size: Optional[int] = None
    """episodes per gradient step"""
    gradient_accumulation_steps: int = 1
    """micro-batches per minibatch (each minibatch's gradient is the same at any value: it saves memory)"""
    ppo_epochs: Optional[int] = None
    """passes over each iteration's episodes"""
    learning_rate: Optional[float] = None
    """AdamW learning rate of the policy"""
    lr_schedule: Optional[str] = None
    """constant or linear (decay to 0)"""
    clip_range: Optional[float] = None
    """PPO ratio clip"""
    kl_coef: Optional[float] = None
    """lambda_kl: fixed KL penalty coefficient (on the sequence reward, summed over pi_theta's tokens)"""
    mle_coef: Optional[float] = None
    """eta: weight of the NLL of the dataset references at every minibatch step"""
    max_grad_norm: Optional[float] = None
    """gradient clipping norm"""
    eval_every: Optional[int] = None
    """evaluate every this many iterations (and at 0 and at the end; 0: only then)"""
    eval_size: Optional[int] = None
    """prompts per evaluation"""
    eval_split: Literal["validation", "test"] = "validation"
    """the split evaluations use: validation during training, test for a final report"""
    save_every: Optional[int] = None
    """checkpoint every this many iterations (always at the end; 0: only then)"""


def main(args):
    tasks.fill_from_preset(args)
    common.check(args.group_size >= 2 and args.rollouts_per_iteration % (args.group_size * common.processes()[1]) == 0,
                 "--group-size must be >= 2 and divide each process's share of --rollouts-per-iteration")
    tasks.require_assets(args, ["dataset_name", "model_name", "reward_model_name", "eval_lm_name"])
    path = runs.run_dir(args)
    rank, processes = common.processes()  # accelerate launch --num_processes N: each process takes 1/N of every batch
    common.seed_everything(args.seed + rank)
    device = common.device_of(args.device)
    dtype = common.dtype_of(args.dtype, device)
    rng = torch.Generator().manual_seed(args.seed + rank)  # rollin coins and restart points only (GRPO draws none)

    tokenizer = common.load_tokenizer(args.model_name)
    data, reward_data = tasks.load_data(args, tokenizer)
    reward_fn = tasks.load_reward(args, data, reward_data, device)
    reference, policy = common.load_reference_and_policy(args, device, dtype)
    frozen_lms = {args.model_name: reference}  # one frozen copy serves every role that names the same checkpoint
    eval_lm = common.load_frozen_lm(args.eval_lm_name, frozen_lms, device, dtype)
    value_head = None  # no critic
    samplers = {POLICY: common.sampler(policy, tokenizer, args.top_k, args.top_p)}

    optimizer = torch.optim.AdamW([{"params": policy.parameters()}],
                                  lr=args.learning_rate, eps=1e-5, weight_decay=0.0)
    updates = args.num_iterations * args.ppo_epochs * (args.rollouts_per_iteration // args.minibatch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, common.lr_lambda(args.lr_schedule, updates))
    start = runs.load_training_state(args.resume, value_head, optimizer, scheduler, rng) if args.resume else 0
    ddp_policy, ddp_value_head = common.data_parallel(policy, value_head)  # the update's passes: gradients averaged over processes
    logger = runs.Logger(path, args, start, args.tensorboard, args.track)
    train, eval_pairs = data["train"], data[args.eval_split][: args.eval_size]

    eval_sampler = common.sampler(policy, tokenizer, args.top_k, args.top_p, num_beams=args.eval_num_beams)

    def evaluate():
        return common.evaluate(eval_sampler, policy, eval_lm, tokenizer, reward_fn, eval_pairs, args, device, args.seed, reference)

    if start == 0:
        metrics, samples = evaluate()
        logger.log({"iteration": 0, "episodes": 0, **metrics}, samples)
        print(f"iteration 0: {metrics}")
    bar = common.progress(args.num_iterations, start, args.exp_name)
    for iteration in range(start + 1, args.num_iterations + 1):
        iteration_start = time.time()
        batch = [train[i] for i in torch.randint(len(train), (args.rollouts_per_iteration // processes // args.group_size,)).repeat_interleave(args.group_size).tolist()]
        prompts, references = [p for p, _ in batch], [r for _, r in batch]
        query, query_mask = common.tokenize_prompts(tokenizer, prompts, args.prompt_len, args.truncation_side, device)
        ref_tokens, ref_mask = common.tokenize_responses(tokenizer, references, args.max_new_tokens, device)

        # ALGO LOGIC: collect. No rollin, no restart: pi_theta generates every token.
        rollin_by = torch.full((len(batch),), NO_ROLLIN, device=device)
        rollout_by = torch.full((len(batch),), POLICY, device=device)
        rollout = common.generate_with_restarts(samplers, query, query_mask, rollin_by, rollout_by, args.max_new_tokens,
                                                args.min_new_tokens, rng, tokenizer.pad_token_id, tokenizer.eos_token_id)
        response, response_mask, by_guide = rollout["response"], rollout["response_mask"], rollout["by_guide"]
        generate_time = time.time() - iteration_start

        # ALGO LOGIC: score. Task reward of the whole sample; -lambda_kl * KL summed over the tokens pi_theta generated.
        policy_tokens = response_mask & ~by_guide
        texts = common.decode_responses(tokenizer, response, response_mask)
        scores = reward_fn(prompts, texts).to(device)
        runs.check_finite(iteration, task_reward=scores)
        with torch.no_grad():
            old_logprobs, _, entropy = common.forward(policy, value_head, query, query_mask, response, response_mask, entropy=True)
            ref_logprobs, _ = common.forward(reference, None, query, query_mask, response, response_mask)
        kl = (old_logprobs - ref_logprobs) * policy_tokens
        rewards = scores - args.kl_coef * kl.sum(1)

        # ALGO LOGIC: advantages. No critic: a sample's reward against its group's (the G samples of its prompt), every
        # token of the sample gets it; the policy loss covers every response token.
        policy_mask = response_mask
        advantages = common.group_advantages(rewards, args.group_size, args.scale_rewards)[:, None] * policy_mask

        # ALGO LOGIC: update. Clipped policy loss + eta * NLL of the references. Each minibatch mb runs as
        # --gradient-accumulation-steps micro-batches mu whose token means divide by mb's token counts: their gradients add
        # up to the whole minibatch's.
        stats = {k: [] for k in ("loss/policy", "loss/mle", "policy/clipfrac", "policy/approx_kl", "grad_norm")}
        for _ in range(args.ppo_epochs):
            for mb in torch.randperm(len(batch)).split(args.minibatch_size // processes):
                optimizer.zero_grad()
                parts = []
                for mu in mb.split(args.minibatch_size // processes // args.gradient_accumulation_steps):
                    logprobs, _ = common.forward(ddp_policy, ddp_value_head, query[mu], query_mask[mu], response[mu], response_mask[mu])
                    log_ratio = logprobs - old_logprobs[mu]
                    ratio = log_ratio.exp()
                    pg_losses = torch.max(-advantages[mu] * ratio, -advantages[mu] * ratio.clamp(1 - args.clip_range, 1 + args.clip_range))
                    pg_loss = common.masked_mean(pg_losses, policy_mask[mu], policy_mask[mb])
                    ref_logprobs_mu, _ = common.forward(policy, None, query[mu], query_mask[mu], ref_tokens[mu], ref_mask[mu])
                    mle_loss = -common.masked_mean(ref_logprobs_mu, ref_mask[mu], ref_mask[mb])
                    loss = pg_loss + args.mle_coef * mle_loss
                    loss.backward()
                    with torch.no_grad():
                        parts.append({"loss/policy": pg_loss, "loss/mle": mle_loss,
                                      "policy/clipfrac": common.masked_mean(((ratio - 1).abs() > args.clip_range).float(), policy_mask[mu], policy_mask[mb]),
                                      "policy/approx_kl": common.masked_mean(0.5 * log_ratio**2, policy_mask[mu], policy_mask[mb])})
                step = common.process_mean({k: sum(part[k] for part in parts) for k in parts[0]})  # the minibatch's means
                step["grad_norm"] = torch.nn.utils.clip_grad_norm_([*policy.parameters()], args.max_grad_norm)
                runs.check_finite(iteration, **step)
                optimizer.step()
                scheduler.step()
                for k, v in step.items():
                    stats[k].append(v.item())

        # Log, evaluate, checkpoint
        row = {"iteration": iteration, "episodes": iteration * args.rollouts_per_iteration,
               "train/reward": common.gather(scores).mean().item(), "train/kl": common.gather(kl.sum(1)).mean().item(),
               "train/response_length": common.gather(response_mask.sum(1)).float().mean().item(),
               "policy/entropy": common.masked_mean(entropy, policy_tokens).item(),
               "train/group_reward_std": common.gather(rewards).view(-1, args.group_size).std(1).mean().item(),
               **{k: sum(v) / len(v) for k, v in stats.items()}, "lr": scheduler.get_last_lr()[0],
               "time/generate_s": generate_time, "time/iteration_s": time.time() - iteration_start}
        samples = None
        if iteration == args.num_iterations or (args.eval_every and iteration % args.eval_every == 0):
            metrics, samples = evaluate()
            row.update(metrics)
        logger.log(row, samples)
        if iteration == args.num_iterations or (args.save_every and iteration % args.save_every == 0):
            runs.save_checkpoint(path, policy, tokenizer, value_head, optimizer, scheduler, iteration, rng)
        bar.update(1)
        bar.set_postfix(reward=f"{row['train/reward']:.3f}", **({"eval": f"{row['eval/reward']:.3f}"} if "eval/reward" in row else {}))
    bar.close()
    logger.close()
    print(f"done: {path}")


if __name__ == "__main__":
    runs.cli(main, Args)
