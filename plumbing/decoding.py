"""The token loops behind every sampler: decoding from a restart state (prompt + response prefix) with one prefill
and a KV cache, a static-cache variant for CUDA graphs (--fast-decoding), and beam search. common.generate_with_restarts
only ever calls `sampler(...)`'s result; this is how it continues a batch of states."""

import collections
import functools
import inspect

import torch
import transformers

from plumbing import check, heap_allocation

# The KV cache's argument and output field: `cache` in transformers 5.2x and later, `past_key_values` before (5.17,
# the GPU machine's), which the later versions still take with a warning until 5.40.
CACHE = "cache" if "cache" in inspect.signature(transformers.GPT2LMHeadModel.forward).parameters else "past_key_values"


def keeps_logits(model):
    """Whether the model computes logits only at its last positions when asked (logits_to_keep: causal LMs of
    transformers 5), so that a pass need not compute the full-vocabulary logits of every prompt position."""
    model = getattr(model, "module", model)  # a DDP wrapper
    model = getattr(model, "peft_model", model)  # LoRA's pi_0 (models.AdaptersOff)
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model
    return "logits_to_keep" in inspect.signature(type(model).forward).parameters


LOGITS_AT_ONCE = 2**24  # a no-grad pass computes at most this many logits at once (64 MB in fp32)


def in_row_chunks(forward):
    """common.forward without gradients (old log-probs, the reference, evaluation) over a whole round at once would
    hold the full-vocabulary logits of every response token of every row, twice over in logsumexp: hundreds of MB
    that the training minibatches never need. Without gradients, the rows go through in chunks of at most
    LOGITS_AT_ONCE logits (on the heap: plumbing.heap_allocation); with gradients, the call is unchanged."""

    @functools.wraps(forward)
    def chunked(model, value_head, query, query_mask, response, response_mask):
        if torch.is_grad_enabled():
            return forward(model, value_head, query, query_mask, response, response_mask)
        config = getattr(getattr(model, "module", model), "config", None)
        per_row = response.shape[1] * getattr(config, "vocab_size", 0)
        rows = max(1, LOGITS_AT_ONCE // per_row) if per_row else len(query)
        with heap_allocation():
            parts = [
                forward(model, value_head, query[i : i + rows], query_mask[i : i + rows], response[i : i + rows],
                        response_mask[i : i + rows])
                for i in range(0, len(query), rows)
            ]  # fmt: skip
        if len(parts) == 1:
            return parts[0]
        values = torch.cat([v for _, v in parts]) if parts[0][1] is not None else None
        return torch.cat([logprobs for logprobs, _ in parts]), values

    return chunked


def _last_logits_only(model):
    """{logits_to_keep: 1} where the model takes it: a prefill then computes the logits of its last position only."""
    return {"logits_to_keep": 1} if keeps_logits(model) else {}


def _filter_logits(logits, top_k, top_p):
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest set whose mass reaches top_p
        drop[:, 0] = False  # the most likely token always stays
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    return logits


def _left_pad(rows, pad_id, device):
    width = max([len(r) for r in rows] + [0])
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r) :] = r
            mask[i, width - len(r) :] = True
    return ids, mask


def _model_inputs(model, query, query_mask, prefix, prefix_mask, pad_id):
    """The restart state as model inputs: a causal LM reads prompt + response prefix as one left-padded sequence; an
    encoder-decoder reads the prompt with its encoder and [decoder start] + response prefix with its decoder."""
    if model.config.is_encoder_decoder:
        start = query.new_tensor([model.config.decoder_start_token_id])
        ids, mask = _left_pad([torch.cat([start, p[m]]) for p, m in zip(prefix, prefix_mask)], pad_id, query.device)
        encoder = model.get_encoder()(input_ids=query, attention_mask=query_mask.long())
        return dict(
            decoder_input_ids=ids,
            decoder_attention_mask=mask.long(),
            encoder_outputs=encoder,
            attention_mask=query_mask.long(),
        )
    ids, mask = _left_pad(
        [torch.cat([q[qm], p[pm]]) for q, qm, p, pm in zip(query, query_mask, prefix, prefix_mask)],
        pad_id,
        query.device,
    )
    mask = mask.long()
    return dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))


def _next_inputs(model, inputs, token):
    """Inputs of one decoding step: the new token, the mask grown by one, the next position."""
    if model.config.is_encoder_decoder:
        mask = torch.cat([inputs["decoder_attention_mask"], torch.ones_like(token)[:, None]], 1)
        return dict(inputs, decoder_input_ids=token[:, None], decoder_attention_mask=mask)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)[:, None]], 1)
    return dict(input_ids=token[:, None], attention_mask=mask, position_ids=inputs["position_ids"][:, -1:] + 1)


def _keep_rows(inputs, cache, keep):
    """Drop finished rows from the inputs and the KV cache, so that every step computes only unfinished rows."""
    cache.reorder_cache(keep)
    return {
        k: (v[keep] if torch.is_tensor(v) else type(v)(last_hidden_state=v.last_hidden_state[keep]))
        for k, v in inputs.items()
    }


def _choose(logits, too_short, top_k, top_p, greedy, eos_id):
    """The next token of each row from its logits [n, V]: no EOS where the row is still too short, then greedy or a
    draw from the top-k / nucleus filtered distribution (one multinomial call over the n rows)."""
    if eos_id is not None:
        logits[:, eos_id] = torch.where(too_short, float("-inf"), logits[:, eos_id])
    if greedy:
        return logits.argmax(-1)
    return torch.multinomial(_filter_logits(logits, top_k, top_p).softmax(-1), 1).squeeze(1)


@torch.no_grad()
def sample(
    model,
    query,
    query_mask,
    prefix,
    prefix_mask,
    max_new,
    min_new,
    top_k=0,
    top_p=1.0,
    greedy=False,
    eos_id=None,
    pad_id=0,
):
    """Continue (prompt, response prefix) states: ONE prefill forward pass over the whole state, then one token per step
    from the KV cache, for the rows not yet finished. max_new/min_new: per-sample budgets (LongTensor [B]). Returns
    (tokens [B, max(max_new)] padded with pad_id after the end, lengths [B]); an EOS the model chose counts."""
    batch, steps = query.shape[0], int(max_new.max()) if len(max_new) else 0
    tokens = torch.full((batch, steps), pad_id, dtype=torch.long, device=query.device)
    lengths = torch.zeros(batch, dtype=torch.long, device=query.device)
    inputs = _model_inputs(model, query, query_mask, prefix, prefix_mask, pad_id)
    keep_last = _last_logits_only(model)
    out = model(**inputs, use_cache=True, **keep_last)
    logits, cache = out.logits[:, -1].float(), getattr(out, CACHE)
    rows = torch.arange(batch, device=query.device)  # the rows still being decoded
    if not (max_new > 0).all():
        keep = (max_new > 0).nonzero().squeeze(1)
        rows, logits, inputs = rows[keep], logits[keep], _keep_rows(inputs, cache, keep)
    for t in range(steps):
        token = _choose(logits, t < min_new[rows], top_k, top_p, greedy, eos_id)
        tokens[rows, t] = token
        lengths[rows] += 1
        going = (t + 1 < max_new[rows]) & ((token != eos_id) if eos_id is not None else True)
        if not going.any():
            break
        if not going.all():
            keep = going.nonzero().squeeze(1)
            rows, token, inputs = rows[keep], token[keep], _keep_rows(inputs, cache, keep)
        inputs = _next_inputs(model, inputs, token)
        out = model(**inputs, **{CACHE: cache}, use_cache=True, **keep_last)
        logits, cache = out.logits[:, -1].float(), getattr(out, CACHE)
    return tokens, lengths


# Fast decoding (--fast-decoding, causal LMs on CUDA): on a GPU a decoding step is mostly kernel-launch overhead, so
# the loop runs over transformers' StaticCache and a one-token step compiled with torch.compile(mode="reduce-overhead")
# (replayed as a CUDA graph). Rows that finish stay in the static batch, fed a pad and ignored: nothing is reshaped in
# the loop. A graph is recorded for one set of shapes and tensor addresses, so the shapes come in a few sizes (the batch
# padded to a power of two >= 8, the cache length rounded up to a multiple of 64) and each size's cache is kept on the
# model and reset for the next call: the step compiles about twice per model (static, then dynamic shapes) and records
# a graph once per size. The tokens are chosen exactly as `sample` chooses them (the same _choose over the real rows
# still going, so the same random numbers give the same tokens: tests/test_common.py checks it on the CPU).
def _decode_step(model, compiled):
    def step(input_ids, attention_mask, position_ids, cache_position, cache):
        return (
            model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache_position=cache_position,
                **{CACHE: cache},
                use_cache=True,
            )
            .logits[:, -1]
            .float()
        )

    if not compiled:
        return step
    if getattr(model, "_compiled_decode_step", None) is None:
        model._compiled_decode_step = torch.compile(step, mode="reduce-overhead")
    return model._compiled_decode_step


MAX_STATIC_CACHES = 4  # per model: the least recently used shape's cache goes first (a cache is many GB at GPT-J size)


def _static_cache(model, batch, length):
    """The model's StaticCache for (batch, length), made once and reset (zeroed, its write position back to 0) on
    reuse; at most MAX_STATIC_CACHES of them are kept."""
    caches = getattr(model, "_static_caches", None)
    if caches is None:
        caches = model._static_caches = collections.OrderedDict()
    if (batch, length) not in caches:
        caches[batch, length] = transformers.StaticCache(config=model.config, max_cache_len=length)
        while len(caches) > MAX_STATIC_CACHES:
            caches.popitem(last=False)
    else:
        caches[batch, length].reset()
        caches.move_to_end((batch, length))
    return caches[batch, length]


@torch.no_grad()
def sample_static(
    model,
    query,
    query_mask,
    prefix,
    prefix_mask,
    max_new,
    min_new,
    top_k=0,
    top_p=1.0,
    greedy=False,
    eos_id=None,
    pad_id=0,
    compiled=False,
):
    """`sample` for a causal LM over a static KV cache (see above): the same arguments, the same result."""
    if hasattr(model, "adapters_off"):  # LoRA's pi_0 (models.AdaptersOff): its adapters stay off for the whole loop,
        with model.adapters_off():  # so that the compiled step is the plain model's and traces as one graph
            args = query, query_mask, prefix, prefix_mask, max_new, min_new, top_k, top_p, greedy, eos_id, pad_id
            return sample_static(model.peft_model, *args, compiled=compiled)
    batch, steps, device = query.shape[0], int(max_new.max()) if len(max_new) else 0, query.device
    inputs = _model_inputs(model, query, query_mask, prefix, prefix_mask, pad_id)
    width = inputs["input_ids"].shape[1]
    size, length = max(8, 1 << (batch - 1).bit_length()), -(-(width + steps) // 64) * 64  # the static shapes
    fill = torch.zeros(size, dtype=torch.long, device=device)
    fill[:batch] = torch.arange(batch, device=device)
    inputs = {k: v[fill] for k, v in inputs.items()}  # rows beyond the batch copy row 0 and are never chosen from
    tokens = torch.full((size, steps), pad_id, dtype=torch.long, device=device)
    lengths = torch.zeros(size, dtype=torch.long, device=device)
    going = torch.zeros(size, dtype=torch.bool, device=device)
    going[:batch] = max_new > 0
    max_new, min_new = max_new[fill], min_new[fill]
    cache = _static_cache(model, size, length)
    mask = torch.cat(
        [inputs["attention_mask"], inputs["attention_mask"].new_zeros((size, length - width))], 1
    )  # grows in place
    logits = (
        model(
            **inputs,
            **{CACHE: cache},
            use_cache=True,
            cache_position=torch.arange(width, device=device),
            **_last_logits_only(model),
        )
        .logits[:, -1]
        .float()
    )
    position, cache_position = inputs["position_ids"][:, -1:].clone(), torch.full((1,), width, device=device)
    step = _decode_step(model, compiled)
    for t in range(steps):
        rows = going.nonzero().squeeze(1)
        if len(rows) == 0:
            break
        token = _choose(logits[rows], t < min_new[rows], top_k, top_p, greedy, eos_id)
        tokens[rows, t] = token
        lengths[rows] += 1
        going[rows] = (t + 1 < max_new[rows]) & ((token != eos_id) if eos_id is not None else True)
        if not going.any():
            break
        mask[:, width + t] = 1
        position += 1
        if compiled:
            # the previous replay's logits were cloned: its buffers may be reused
            torch.compiler.cudagraph_mark_step_begin()
        logits = step(
            tokens[:, t : t + 1].contiguous(), mask, position, cache_position, cache
        ).clone()  # a finished row feeds its pad
        cache_position += (
            1  # read by transformers versions that index the cache by it (5.17 and later count for themselves)
        )
    return tokens[:batch], lengths[:batch]


@torch.no_grad()
def beam_search(model, query, query_mask, max_new, min_new, num_beams, eos_id, pad_id):
    """Beam search from the prompt (CommonGen's evaluation decoding), through transformers' generate."""
    out = model.generate(
        input_ids=query,
        attention_mask=query_mask.long(),
        num_beams=num_beams,
        do_sample=False,
        max_new_tokens=int(max_new.max()),
        min_new_tokens=int(min_new.min()),
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    tokens = (
        out[:, 1:] if model.config.is_encoder_decoder else out[:, query.shape[1] :]
    )  # drop the start token / prompt
    ended = (tokens == eos_id).long().cumsum(1)
    lengths = ((ended == 0) | ((ended == 1) & (tokens == eos_id))).sum(1)
    return torch.where(
        torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths[:, None], tokens, pad_id
    ), lengths


def sampler(model, tokenizer, top_k, top_p, greedy=False, num_beams=1, fast=False):
    """A model as a black box that continues a batch of (prompt, response prefix) states: the interface any guide
    offers. Beam search (num_beams > 1) only starts from the prompt (evaluation). fast (--fast-decoding): a causal LM on
    CUDA samples through sample_static, compiled."""

    def continue_prefixes(query, query_mask, prefix, prefix_mask, max_new, min_new):
        with heap_allocation():  # a few MB per token, all freed by the end: no page faults for them
            return decode(query, query_mask, prefix, prefix_mask, max_new, min_new)

    def decode(query, query_mask, prefix, prefix_mask, max_new, min_new):
        if num_beams > 1:
            check(prefix.shape[1] == 0, "beam search cannot restart from a response prefix")
            return beam_search(
                model, query, query_mask, max_new, min_new, num_beams, tokenizer.eos_token_id, tokenizer.pad_token_id
            )
        if fast and query.is_cuda and not model.config.is_encoder_decoder:
            return sample_static(
                model,
                query,
                query_mask,
                prefix,
                prefix_mask,
                max_new,
                min_new,
                top_k,
                top_p,
                greedy,
                tokenizer.eos_token_id,
                tokenizer.pad_token_id,
                compiled=True,
            )
        return sample(
            model,
            query,
            query_mask,
            prefix,
            prefix_mask,
            max_new,
            min_new,
            top_k,
            top_p,
            greedy,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
        )

    return continue_prefixes
