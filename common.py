"""The helpers every algorithm script shares, and nothing else: batches of prompts and responses, generation with
restarts (the paper's Fig. 2), the forward pass and value heads, GAE, whitening and the other masked statistics, and
evaluation. No algorithm lives here: each script holds its own rollin choice, masks and losses. What the scripts also
need but a reader may skip (loading models, data-parallel processes, the token loops of decoding, the run's
bookkeeping) is in plumbing/; the tasks (presets, data, rewards) are in tasks/."""

import math
import random

import torch

from plumbing.decoding import in_row_chunks, keeps_logits
from plumbing.parallel import gather_lists, processes, total

# Who generates a token (generate_with_restarts): no rollin at all, the policy pi_theta, or the guide pi_g.
NO_ROLLIN, POLICY, GUIDE = -1, 0, 1


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# Batches: left-padded prompts, right-padded responses.
# ---------------------------------------------------------------------------------------------------------------
def tokenize_prompts(tokenizer, prompts, max_len, truncation_side, device):
    tokenizer.truncation_side = truncation_side
    enc = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=max_len)
    return enc.input_ids.to(device), enc.attention_mask.bool().to(device)


def tokenize_responses(tokenizer, texts, max_len, device):
    """Right-padded continuation tokens (for the references of the MLE term and the reference perplexity)."""
    ids = [tokenizer(t, add_special_tokens=False).input_ids[:max_len] for t in texts]
    width = max(1, max(len(x) for x in ids))
    out = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, : len(x)] = torch.tensor(x, dtype=torch.long)
    lengths = torch.tensor([len(x) for x in ids])
    return out.to(device), (torch.arange(width)[None] < lengths[:, None]).to(device)


def decode_responses(tokenizer, response, response_mask):
    return [tokenizer.decode(r[m].tolist(), skip_special_tokens=True) for r, m in zip(response, response_mask)]


# ---------------------------------------------------------------------------------------------------------------
# Generation with restarts (paper Fig. 2): rollin, restart at h, rollout from the restart state.
# ---------------------------------------------------------------------------------------------------------------
def generate_with_restarts(
    samplers, query, query_mask, rollin_by, rollout_by, max_new_tokens, min_new_tokens, rng, tokenizer
):
    """Paper Fig. 2 for a batch. samplers: {POLICY: fn, GUIDE: fn} (plumbing/decoding.py's `sampler`); the tokenizer
    gives the pad and EOS ids. Per sample, rollin_by is NO_ROLLIN, POLICY or GUIDE; rollout_by is POLICY or GUIDE.
      1. rollin: the rollin policy generates a complete response;
      2. restart: h ~ Uniform{1, ..., L-1} (L = the rollin's length; h = 0 without a rollin, or when L < 2). A rollin of
         pi_theta that ended with its own EOS allows h = L too: stopping is one of pi_theta's actions, and AggreVaTeD
         must be able to score it (its Q is the final reward: nothing is left for the guide);
      3. rollout: the rollout policy continues from (prompt, first h rollin tokens), one prefill, to the length budget,
         unless the kept prefix already ends with EOS.
    With a fixed length (min = max), L is known before the rollin, so h is drawn first and the rollin stops at h; a
    rollin that stops sooner (a guide that chose to stop) restarts where its own tokens end, never after an EOS.
    Returns dict(response [B, N], response_mask, by_guide (which tokens the guide generated), restart_at = h,
    short_rollin: the rollins that stopped before their drawn h)."""
    batch, device, pad_id, eos_id = query.shape[0], query.device, tokenizer.pad_token_id, tokenizer.eos_token_id
    n = max_new_tokens
    response = torch.full((batch, n), pad_id, dtype=torch.long, device=device)
    by_guide = torch.zeros((batch, n), dtype=torch.bool, device=device)
    restart_at = torch.zeros(batch, dtype=torch.long, device=device)
    ended = torch.zeros(batch, dtype=torch.bool, device=device)  # the kept rollin ends with pi_theta's EOS: no rollout
    short_rollin = torch.zeros(batch, dtype=torch.bool, device=device)
    fixed_length = min_new_tokens >= max_new_tokens
    uniform = torch.rand(batch, generator=rng).to(device)  # one draw per sample, used only where it has a rollin
    empty = query.new_zeros((batch, 0))  # no response prefix: a rollin starts from the prompt
    if fixed_length and n >= 2:
        restart_at = torch.where(rollin_by != NO_ROLLIN, 1 + (uniform * (n - 1)).long(), 0)
    for who in (POLICY, GUIDE):  # 1. rollin
        idx = (rollin_by == who).nonzero().squeeze(1)
        if len(idx) == 0:
            continue
        budget = restart_at[idx] if fixed_length else torch.full_like(idx, n)
        minimum = budget if fixed_length else torch.full_like(idx, min_new_tokens)
        rollin, lengths = samplers[who](query[idx], query_mask[idx], empty[idx], empty[idx].bool(), budget, minimum)
        response[idx, : rollin.shape[1]] = rollin
        by_guide[idx] = who == GUIDE
        stopped = (lengths >= 1) & (rollin[torch.arange(len(idx), device=device), (lengths - 1).clamp(min=0)] == eos_id)
        if fixed_length:  # 2. restart at the drawn h, or where a rollin that stopped sooner ends (before its EOS)
            own = lengths - stopped.long()
            short_rollin[idx] = own < restart_at[idx]
            restart_at[idx] = torch.minimum(restart_at[idx], own)
        else:  # 2. restart: h ~ U{1, ..., choices}
            stopped &= who == POLICY
            choices = lengths - 1 + stopped.long()
            restart_at[idx] = torch.where(choices >= 1, 1 + (uniform[idx] * choices.clamp(min=1)).long(), 0)
            ended[idx] = stopped & (restart_at[idx] == lengths)
    keep = torch.arange(n, device=device)[None] < restart_at[:, None]
    response = torch.where(keep, response, pad_id)
    by_guide &= keep
    width = int(restart_at.max()) if batch else 0
    prefix, prefix_mask = response[:, :width], keep[:, :width]  # right-padded: a sampler reads the mask
    lengths = restart_at.clone()
    for who in (POLICY, GUIDE):  # 3. rollout
        idx = ((rollout_by == who) & ~ended).nonzero().squeeze(1)
        if len(idx) == 0:
            continue
        budget, minimum = n - restart_at[idx], (min_new_tokens - restart_at[idx]).clamp(min=0)
        rollout, new = samplers[who](query[idx], query_mask[idx], prefix[idx], prefix_mask[idx], budget, minimum)
        for j, i in enumerate(idx.tolist()):
            h, k = restart_at[i].item(), new[j].item()
            response[i, h : h + k] = rollout[j, :k]
            by_guide[i, h : h + k] = who == GUIDE
        lengths[idx] += new
    response_mask = torch.arange(n, device=device)[None] < lengths[:, None]
    return dict(response=response, response_mask=response_mask, by_guide=by_guide, restart_at=restart_at,
                short_rollin=short_rollin)  # fmt: skip


def restart_stats(rollout, rollin_by):
    """The restarts' logged figures: the mean restart point h of the samples that roll in, and the share of them whose
    rollin stopped before its drawn h (a guide that chose to stop early; it restarts where its tokens end)."""
    rolled_in = rollin_by != NO_ROLLIN
    return {"rlgf/restart_mean": masked_mean(rollout["restart_at"].float(), rolled_in).item(),
            "rlgf/short_rollin_share": masked_mean(rollout["short_rollin"].float(), rolled_in).item()}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Forward passes, GAE, whitening
# ---------------------------------------------------------------------------------------------------------------
class ValueHeads(torch.nn.Module):
    """`heads` linear value heads on pi_theta's last hidden state, zero-initialised (no random numbers drawn). Each
    head's values are computed on their own, so that a script with two heads gives the first head's values, and the
    trunk's gradients from them, bit for bit as a script with one head does. With a trunk of their own (--critic
    separate: models.critic_trunk), the heads read its hidden states instead, and no gradient of theirs reaches the
    policy."""

    def __init__(self, hidden_size, heads, trunk=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(heads, hidden_size))
        self.bias = torch.nn.Parameter(torch.zeros(heads))
        self.trunk = trunk  # not a submodule: its weights are trained with the policy's (a LoRA adapter of its model)

    def forward(self, states):
        return torch.stack([states @ w + b for w, b in zip(self.weight, self.bias)], -1)


def value_head(policy, heads, device):
    return ValueHeads(policy.config.hidden_size, heads, getattr(policy, "critic_trunk", None)).to(device)


def _inputs(config, query, query_mask, response, response_mask):
    """The model inputs of prompt + response, and where the response's next-token predictions start."""
    if config.is_encoder_decoder:  # decoder input: [start] + response[:-1]; position t predicts response[t]
        start = response.new_full((len(response), 1), config.decoder_start_token_id)
        decoder_mask = torch.cat([torch.ones_like(start), response_mask[:, :-1].long()], 1)
        inputs = dict(input_ids=query, attention_mask=query_mask.long(), decoder_attention_mask=decoder_mask)
        return inputs | dict(decoder_input_ids=torch.cat([start, response[:, :-1]], 1)), 0
    mask = torch.cat([query_mask, response_mask], 1).long()  # one sequence: position Lq - 1 + t predicts response[t]
    inputs = dict(
        input_ids=torch.cat([query, response], 1), attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)
    )
    return inputs, query.shape[1] - 1


def _logits(model, query, query_mask, response, response_mask, hidden=False):
    """Next-token logits at every response position [B, N, V] (and the last hidden states there, when asked)."""
    config = model.module.config if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model.config
    inputs, start = _inputs(config, query, query_mask, response, response_mask)
    n, keep = response.shape[1], not config.is_encoder_decoder and keeps_logits(model)
    out = model(
        **inputs, output_hidden_states=hidden, **({"logits_to_keep": n + 1} if keep else {})
    )  # not the prompt's
    logits = out.logits[:, :n] if keep else out.logits[:, start : start + n]
    states = (out.decoder_hidden_states if config.is_encoder_decoder else out.hidden_states)[-1] if hidden else None
    return logits.float(), states[:, start : start + n] if hidden else None


@in_row_chunks  # without gradients, a few rows at a time (memory; plumbing/decoding.py)
def forward(model, value_head, query, query_mask, response, response_mask):
    """One forward pass over prompt + response: log pi(a_t | s_t) for every response token [B, N] and, with a
    value head, V(s_t) from each head [B, N, heads] (the state s_t is everything before a_t)."""
    trunk = getattr(getattr(value_head, "module", value_head), "trunk", None)  # a separate critic's (DDP: .module)
    logits, states = _logits(
        model, query, query_mask, response, response_mask, hidden=value_head is not None and trunk is None
    )
    logprobs = logits.gather(2, response[..., None]).squeeze(-1) - logits.logsumexp(-1)  # log_softmax at a_t only
    if trunk is not None:  # the critic's own trunk reads the same tokens
        inputs, start = _inputs(trunk.config, query, query_mask, response, response_mask)
        states = trunk(**inputs)[:, start : start + response.shape[1]]
    values = value_head(states.float()) if value_head is not None else None
    return logprobs, values


def masked_mean(x, mask, whole=None):
    """Mean of x over the masked entries of the global batch (every process's share). whole: the mask of the minibatch
    of which x is a micro-batch: then x's part of the minibatch's mean, divided by the minibatch's token count over
    all processes (times their number), so that the micro-batches' parts add up to it (gradient accumulation) and the
    processes' parts average to it (as data-parallel training averages their gradients)."""
    if whole is not None:
        return (x * mask).sum() * processes()[1] / total(whole.sum()).clamp(min=1)
    return total((x * mask).sum()) / total(mask.sum()).clamp(min=1)


def masked_whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the masked entries only; entries outside the mask come back as 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = total(mask.sum())
    var = var * n / (n - 1) if n > 1 else var  # unbiased, like torch.var
    return torch.where(mask.bool(), (x - mean) * torch.rsqrt(var + eps), 0.0)


def gae(rewards, values, mask, gamma, lam, rollin=None):
    """Generalized advantage estimation over each response: delta_t = r_t + gamma V(s_{t+1}) - V(s_t), A_t = delta_t +
    gamma lam A_{t+1}; V = 0 after the last real token. Returns (advantages, returns = A + V).
    rollin: pi_theta's rollin tokens of AggreVaTeD samples (paper Sec. 5), after which the guide acts, not pi_theta.
    Each gets A^{pi_g}(s_t, a_t) = Q^{pi_g}(s_t, a_t) - V^{pi_g}(s_t), so the trace never runs through pi_theta's
    later tokens: A_t = delta_t while a_{t+1} is pi_theta's too, and the last one bootstraps into the guide's
    lambda-return from s_h: A_{h-1} = delta_{h-1} + gamma A_h."""
    rewards, values = rewards * mask, values * mask
    trace = torch.full_like(rewards, lam)  # the lambda that weighs A_{t+1} in A_t
    if rollin is not None:
        rollin = rollin.bool()
        next_rollin = torch.cat([rollin[:, 1:], torch.zeros_like(rollin[:, :1])], 1)
        trace = torch.where(rollin, (~next_rollin).to(trace.dtype), trace)
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * trace[:, t] * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, advantages + values


def group_advantages(rewards, group_size, scale=True, eps=1e-4):
    """GRPO's critic-free advantage: each reward minus the mean of its group (group_size consecutive samples of one
    prompt), divided by the group's std (unbiased, + eps) when `scale`; unscaled is Dr. GRPO's choice."""
    groups = rewards.view(-1, group_size)
    centered = groups - groups.mean(1, keepdim=True)
    return (centered / (groups.std(1, keepdim=True) + eps) if scale else centered).reshape(-1)


def explained_variance(values, returns, mask):
    """1 - Var(returns - V) / Var(returns) over the critic's tokens: 1 is a perfect critic, 0 no better than a constant
    (None when the returns do not vary, e.g. no token is the critic's)."""
    var = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    return (1 - masked_mean((residual - masked_mean(residual, mask)) ** 2, mask) / var).item() if var > 0 else None


def last_token_index(response_mask):
    return (response_mask.long().sum(1) - 1).clamp(min=0)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def perplexity(model, tokenizer, prompts, continuations, args, device, batch_size=16):
    """exp(mean NLL per token) of the continuations given their prompts (each process passes its share)."""
    nll, count = 0.0, 0
    for i in range(0, len(prompts), batch_size):
        q, qm = tokenize_prompts(tokenizer, prompts[i : i + batch_size], args.prompt_len, args.truncation_side, device)
        r, rm = tokenize_responses(tokenizer, continuations[i : i + batch_size], args.max_new_tokens, device)
        logprobs, _ = forward(model, None, q, qm, r, rm)
        nll -= (logprobs * rm).sum().item()
        count += rm.sum().item()
    if processes()[1] > 1:
        nll, count = total(torch.tensor([nll, count], dtype=torch.float64, device=device)).tolist()
    return math.exp(nll / max(count, 1))


@torch.no_grad()
def kl_from_reference(model, reference, query, query_mask, response, response_mask):
    """Sum over each response of KL(pi(. | s_t) || pi_0(. | s_t)): the exact KL of the whole next-token distributions
    at the states the response visits [B] (>= 0, unlike log-prob differences of top-k samples)."""
    logp = _logits(model, query, query_mask, response, response_mask)[0].log_softmax(-1)
    logp0 = _logits(reference, query, query_mask, response, response_mask)[0].log_softmax(-1)
    return ((logp.exp() * (logp - logp0)).sum(-1) * response_mask).sum(1)


def task_metrics(reward_fn, prompts, generations):
    """Metrics beyond the reward that a task's scorer offers (CommonGen: BLEU-4, CIDEr-D, ...)."""
    return reward_fn.metrics(prompts, generations) if hasattr(reward_fn, "metrics") else {}


@torch.no_grad()
def evaluate(generate, model, eval_lm, tokenizer, reward_fn, pairs, args, device, seed, reference=None, batch_size=32):
    """Reward of the generations, perplexity of the references under `model` (skipped when None: a black-box guide),
    output perplexity of the generations under the fixed eval LM, KL of `model` from the `reference` pi_0 along its
    own generations (eval/kl, when both are given), and a few samples. Sampling runs under its own seed and leaves the
    training random stream untouched. Each process evaluates its share of the pairs; the figures are of them all.
    Best-of-N (--eval-best-of N > 1): N samples per prompt, and the reward keeps the one it scores highest."""
    rank, count = processes()
    pairs = pairs[rank * len(pairs) // count : (rank + 1) * len(pairs) // count]
    prompts, references = [p for p, _ in pairs], [r for _, r in pairs]
    texts, kl, best, n_best = [], [], [], getattr(args, "eval_best_of", 1)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            q, qm = tokenize_prompts(tokenizer, chunk, args.prompt_len, args.truncation_side, device)
            q, qm = q.repeat_interleave(n_best, 0), qm.repeat_interleave(n_best, 0)  # N copies of each prompt
            budget, minimum = (
                torch.full((len(q),), n, device=device) for n in (args.max_new_tokens, args.min_new_tokens)
            )
            tokens, lengths = generate(q, qm, q[:, :0], qm[:, :0], budget, minimum)
            mask = torch.arange(tokens.shape[1], device=device)[None] < lengths[:, None]
            batch_texts = decode_responses(tokenizer, tokens, mask)
            if n_best > 1:  # keep the sample of each prompt that the reward scores highest
                scores = reward_fn([p for p in chunk for _ in range(n_best)], batch_texts).view(-1, n_best)
                best += scores.max(1).values.tolist()  # the kept samples' rewards: no second scoring below
                keep = (scores.argmax(1) + torch.arange(len(scores)) * n_best).tolist()
                q, qm, tokens, mask = q[keep], qm[keep], tokens[keep], mask[keep]
                batch_texts = [batch_texts[j] for j in keep]
            texts += batch_texts
            if model is not None and reference is not None and model is not reference:
                kl += kl_from_reference(model, reference, q, qm, tokens, mask).tolist()
            elif model is not None and model is reference:  # pi_0 itself
                kl += [0.0] * len(q)
    rewards = reward_fn(prompts, texts) if n_best == 1 else torch.tensor(best)
    metrics = {"eval/output_perplexity": perplexity(eval_lm, tokenizer, prompts, texts, args, device)}
    if model is not None:
        metrics["eval/perplexity"] = perplexity(model, tokenizer, prompts, references, args, device)
    if count > 1:  # every process's share, in order
        prompts, texts, kl = gather_lists(prompts), gather_lists(texts), gather_lists(kl)
        rewards = torch.tensor(gather_lists(rewards.tolist()), dtype=rewards.dtype)
    metrics["eval/reward"] = rewards.mean().item()
    metrics |= {f"eval/{k}": v for k, v in task_metrics(reward_fn, prompts, texts).items()}
    if kl:
        metrics["eval/kl"] = sum(kl) / len(kl)
    samples = [dict(prompt=p, generation=t, reward=round(r, 4)) for p, t, r in zip(prompts, texts, rewards.tolist())]
    return metrics, samples[:4]


# ---------------------------------------------------------------------------------------------------------------
# The learning-rate schedule
# ---------------------------------------------------------------------------------------------------------------
def lr_lambda(schedule, total_updates):
    if schedule == "linear":
        return lambda step: max(0.0, 1.0 - step / max(1, total_updates))
    return lambda step: 1.0
