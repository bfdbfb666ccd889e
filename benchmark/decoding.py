"""One decoding call, three ways, side by side in one run: transformers' generate with its dynamic KV cache, our plain
loop (decoding.sample: a dynamic cache that drops finished rows) and the fast path (decoding.sample_static: a static
cache and, on CUDA, a compiled one-token step replayed as a CUDA graph).

    python benchmark/decoding.py                      # the GPT-2-small shape below; bf16 on CUDA
    python benchmark/decoding.py --prefix-len 24      # rollouts from restart states: prompt + a response prefix
    python benchmark/decoding.py --layers 2 --batch 8 --repeats 2    # a few seconds on a CPU (the fast path uncompiled)

Shape (issue 12's): GPT-2 small (124M, random weights: the time does not depend on what a model knows), batch 64,
prompt 64 tokens (left-padded: a row's real length is drawn from [prompt/2, prompt]), 48 new tokens, top-k 50, no EOS
(every row runs its whole budget, as in the reported figure). Each way runs `--warmup` calls first (the fast path
compiles and records there), then the median of `--repeats` timed calls, synchronized on CUDA, is printed with its
ratio to generate's."""

import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
import transformers
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing import decoding, models, parallel  # noqa: E402


@dataclass
class Args:
    batch: int = 64
    """rows per call"""
    prompt_len: int = 64
    """prompt tokens (the widest row; left padding for the others)"""
    prefix_len: int = 0
    """response-prefix tokens of a restart state (0: decoding starts at the prompt)"""
    new_tokens: int = 48
    """tokens decoded per row"""
    top_k: int = 50
    """top-k sampling"""
    layers: int = 12
    """transformer blocks (12: GPT-2 small)"""
    device: str = "auto"
    """cuda if available, else cpu"""
    dtype: str = "auto"
    """auto: bfloat16 on CUDA, float32 elsewhere"""
    compile: Literal["auto", "on", "off"] = "auto"
    """the fast path's compiled step: auto (on CUDA only), on, off"""
    warmup: int = 3
    """untimed calls of each way first"""
    repeats: int = 10
    """timed calls of each way (the median is reported)"""


def main(args):
    if (
        min(args.batch, args.prompt_len, args.new_tokens, args.layers, args.repeats) < 1
        or min(args.prefix_len, args.warmup, args.top_k) < 0
    ):
        sys.exit(
            "error: --batch, --prompt-len, --new-tokens, --layers and --repeats must be >= 1; "
            "--prefix-len, --warmup, --top-k >= 0"
        )
    device = parallel.device_of(args.device)
    dtype = models.dtype_of(args.dtype, device)
    compiled = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=args.layers, bos_token_id=50256, eos_token_id=50256, pad_token_id=50256)
    model = transformers.GPT2LMHeadModel(config).to(device, dtype).eval()
    g = torch.Generator().manual_seed(1)
    rows = [
        torch.randint(0, 50000, (int(n),), generator=g)
        for n in torch.randint(args.prompt_len // 2, args.prompt_len + 1, (args.batch,), generator=g)
    ]
    query, query_mask = (t.to(device) for t in decoding._left_pad(rows, config.pad_token_id, "cpu"))
    prefix = torch.randint(0, 50000, (args.batch, args.prefix_len), generator=g).to(device)
    prefix_mask = torch.ones_like(prefix, dtype=torch.bool)
    budget = torch.full((args.batch,), args.new_tokens, device=device)
    no_min = torch.zeros_like(budget)

    def hf_generate():
        inputs = decoding._model_inputs(model, query, query_mask, prefix, prefix_mask, config.pad_token_id)
        return model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            do_sample=True,
            top_k=args.top_k,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            pad_token_id=config.pad_token_id,
        )

    ways = {
        "generate (dynamic cache)": hf_generate,
        "decoding.sample": lambda: decoding.sample(
            model, query, query_mask, prefix, prefix_mask, budget, no_min, top_k=args.top_k, pad_id=config.pad_token_id
        ),
        "decoding.sample_static" + (" (compiled)" if compiled else ""): lambda: decoding.sample_static(
            model,
            query,
            query_mask,
            prefix,
            prefix_mask,
            budget,
            no_min,
            top_k=args.top_k,
            pad_id=config.pad_token_id,
            compiled=compiled,
        ),
    }

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    medians = {}
    for name, fn in ways.items():
        warm = [timed(fn) for _ in range(args.warmup)]
        medians[name] = statistics.median(timed(fn) for _ in range(args.repeats))
        print(f"{name}: warm-up calls {', '.join(f'{w * 1e3:.0f}' for w in warm)} ms", flush=True)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"\n{where}, {dtype}, torch {torch.__version__}, transformers {transformers.__version__}: batch {args.batch}, "
        f"prompt {args.prompt_len}, prefix {args.prefix_len}, {args.new_tokens} new tokens, top-k {args.top_k}, "
        f"{args.layers} layers "
        f"(median of {args.repeats} calls)"
    )
    base = medians["generate (dynamic cache)"]
    for name, seconds in medians.items():
        print(f"{name:<36} {seconds * 1e3:>9.1f} ms {base / seconds:>7.2f}x")


if __name__ == "__main__":
    main(tyro.cli(Args))
