"""A learned reward model (Bradley-Terry, trained by reward_model.py): the model, its checkpoint format, and the reward
it gives the RL scripts. r(x, y) is a linear head on a causal LM trunk's hidden state at the LAST REAL token of
prompt + response; the reward is the raw scalar, as the paper's "RM score" is."""

import json
import math
import os

import safetensors
import torch
import transformers
from safetensors.torch import load_file, save_file, save_model

from plumbing import UserError, check, models


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
        hidden = self.trunk(
            input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)
        ).last_hidden_state
        last = last_real_index(mask)
        return self.head(hidden[torch.arange(len(hidden), device=hidden.device), last].float()).squeeze(-1)


def last_real_index(attention_mask):
    """The column of each row's last real token, for left or right padding alike."""
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (columns + 1)).argmax(1)


def score(model, tokenizer, texts, max_length, device, batch_size=16):
    """Rewards of whole texts (prompt + response) [N], the same code path in training and as an RL reward."""
    tokenizer.truncation_side = "left"
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length
        ).to(device)
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
    save_file(
        {k: v.detach().float().cpu().contiguous() for k, v in model.head.state_dict().items()},
        os.path.join(path, "reward_head.safetensors"),
    )
    tokenizer.save_pretrained(path)
    with open(os.path.join(path, "reward_model.json"), "w") as f:
        json.dump(info, f, indent=1)


def load(path, device, dtype=torch.float32):
    """(frozen RewardModel, tokenizer, info) from a directory `save` wrote."""
    try:
        with open(os.path.join(path, "reward_model.json")) as f:
            info = json.load(f)
        check(
            isinstance(info, dict) and isinstance(info.get("max_length"), int), "its fields are not reward_model.py's"
        )
        head = load_file(os.path.join(path, "reward_head.safetensors"))
    except (OSError, ValueError, safetensors.SafetensorError, UserError) as e:
        raise UserError(f"--reward-model-name {path}: a damaged reward_model.py checkpoint ({e})") from None
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        trunk = models._peft().PeftModel.from_pretrained(load_trunk(info["base"], dtype), path).merge_and_unload()
    else:  # the trunk as `save` wrote it
        trunk = models._loaded(lambda p: transformers.AutoModel.from_pretrained(p, dtype=dtype), path)
    model = RewardModel(trunk)
    try:
        model.head.load_state_dict(head)
    except RuntimeError as e:
        raise UserError(f"--reward-model-name {path}: reward_head.safetensors does not fit its trunk ({e})") from None
    return models.frozen(model.to(device)), models.load_tokenizer(path), info


def load_trunk(name, dtype=torch.float32):
    """The transformer of a causal LM checkpoint, its LM head dropped. Loaded through the causal LM class: a checkpoint
    with tied embeddings may hold them only as the LM head's weight (ours of smollm2-135m does), which the bare
    transformer class would not read, leaving its embeddings random."""
    return models._loaded(lambda p: transformers.AutoModelForCausalLM.from_pretrained(p, dtype=dtype), name).base_model


class LearnedReward:
    """A reward_model.py checkpoint as the RL scripts' reward: r(prompt + generation), the raw scalar."""

    def __init__(self, path, device, dtype=torch.float32):
        self.model, self.tokenizer, info = load(path, device, dtype)
        self.max_length, self.device = info["max_length"], device
        print(f"reward model ({path}): held-out pair accuracy {info['accuracy_after']}")

    @torch.no_grad()
    def __call__(self, prompts, generations):
        return (
            score(
                self.model, self.tokenizer, [p + g for p, g in zip(prompts, generations)], self.max_length, self.device
            )
            .float()
            .cpu()
        )
