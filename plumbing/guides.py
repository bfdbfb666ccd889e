"""Guides that continue TEXT: an LLM behind an OpenAI-compatible completions endpoint (vLLM, llama.cpp's server,
`transformers serve`, an API), or a local LM whose tokenizer is not the policy's. The paper's guide is such a black
box: RL may only ask it to continue a prefix.

`text_guide` puts one of them behind the token-level interface every guide offers (common.sampler's): the restart
state (prompt + kept response prefix, in the policy's token ids) goes to the guide as text, decoded with the policy's
tokenizer; the continuation comes back as text and is tokenized with the policy's tokenizer, then cut to the sample's
token budget. The kept prefix stays the exact ids the policy saw, so losses, masks and the KL only ever see
policy-tokenizer ids, and by_guide marks exactly the tokens that came from the guide's text.

The seam: prefix ids + ids(continuation) need not be ids(prefix text + continuation) (a word split across the
restart point re-tokenizes otherwise). The guide counts the states where they differ; the scripts log the share as
rlgf/guide_seam_retokenized (seam_stats)."""

import concurrent.futures
import os
import urllib.parse

import torch

from plumbing import UserError, check
from plumbing.decoding import sample
from plumbing.parallel import device_of, total

ASKS = 4  # a guide that stops before the sample's minimum length is asked to continue, at most this many times in all


def text_guide(complete, tokenizer):
    """complete(texts, max_tokens) -> [(continuation text, stopped: it ended with the guide's EOS)], max_tokens per
    text."""
    seam = {"states": 0, "retokenized": 0, "text_changed": 0}

    def continue_prefixes(query, query_mask, prefix, prefix_mask, max_new, min_new):
        n, budget, minimum = len(query), max_new.tolist(), min_new.tolist()
        kept = [p[m].tolist() for p, m in zip(prefix, prefix_mask)]
        context = [q[qm].tolist() + k for q, qm, k in zip(query, query_mask, kept)]  # the state, in the policy's ids
        states = [tokenizer.decode(c, skip_special_tokens=True) for c in context]
        text, new, stopped = [""] * n, [[] for _ in range(n)], [False] * n
        for _ in range(ASKS):
            ask = [i for i in range(n) if len(new[i]) < minimum[i] or (not stopped[i] and len(new[i]) < budget[i])]
            if not ask:
                break
            answers = complete([states[i] + text[i] for i in ask], [budget[i] - len(new[i]) for i in ask])
            for i, (more, ended) in zip(ask, answers):
                text[i] += more
                new[i] = continuation_ids(tokenizer, context[i], text[i])[: budget[i]]
                stopped[i] = ended or not more
        tokens = torch.full((n, max(budget, default=0)), tokenizer.pad_token_id, dtype=torch.long)
        lengths = torch.zeros(n, dtype=torch.long)
        for i in range(n):
            eos = [tokenizer.eos_token_id] if stopped[i] and len(new[i]) < budget[i] else []  # the guide chose to stop
            tokens[i, : len(new[i]) + len(eos)], lengths[i] = (
                torch.tensor(new[i] + eos, dtype=torch.long),
                len(new[i]) + len(eos),
            )
            joint = tokenizer(tokenizer.decode(kept[i]) + text[i], add_special_tokens=False).input_ids
            seam["states"] += 1
            seam["retokenized"] += joint[: len(kept[i]) + len(new[i])] != kept[i] + new[i]
            whole = tokenizer.decode(
                context[i] + continuation_ids(tokenizer, context[i], text[i]), skip_special_tokens=True
            )
            seam["text_changed"] += whole != states[i] + text[i]
        return tokens.to(query.device), lengths.to(query.device)

    continue_prefixes.seam = seam
    return continue_prefixes


def continuation_ids(tokenizer, context, text):
    """The policy tokenizer's ids of `text` that, after the ids `context` (prompt + kept prefix), decode to exactly
    that text. Tokenized alone, a SentencePiece tokenizer (T5, Llama) marks text's first word as a word start ("ely"
    becomes "\u2581ely", so "absolut" + "ely" would read "absolut ely"); tokenized after a newline, whose ids are then
    dropped, it does not. When neither reproduces the text: the plain tokenization (seam_stats counts it)."""
    plain = tokenizer(text, add_special_tokens=False).input_ids
    newline = tokenizer("\n", add_special_tokens=False).input_ids
    after = tokenizer("\n" + text, add_special_tokens=False).input_ids
    before = tokenizer.decode(context, skip_special_tokens=True)
    for ids in (plain, after[len(newline) :] if after[: len(newline)] == newline else None):
        if ids is not None and tokenizer.decode(context + ids, skip_special_tokens=True) == before + text:
            return ids
    return plain


def local_completer(model, guide_tokenizer, top_k, top_p):
    """A local LM with its own tokenizer as a text continuer: its tokenizer reads the state, it samples, its
    tokenizer writes the continuation. guide_tokenizer: as common.load_tokenizer returns it (left padding, a pad
    token)."""

    def complete(texts, max_tokens):
        enc = guide_tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        mask = enc.attention_mask.bool()
        empty = enc.input_ids.new_zeros((len(texts), 0))
        budget = torch.tensor(max_tokens, device=model.device)
        tokens, lengths = sample(
            model,
            enc.input_ids,
            mask,
            empty,
            empty.bool(),
            budget,
            torch.zeros_like(budget),
            top_k,
            top_p,
            eos_id=guide_tokenizer.eos_token_id,
            pad_id=guide_tokenizer.pad_token_id,
        )
        out = []
        for row, length in zip(tokens.tolist(), lengths.tolist()):
            ended = length > 0 and row[length - 1] == guide_tokenizer.eos_token_id
            out.append((guide_tokenizer.decode(row[: length - ended], skip_special_tokens=True), ended))
        return out

    return complete


def openai_completer(
    model,
    api_base,
    top_p,
    workers=8,
    timeout=120.0,
    retries=3,
    temperature=1.0,
    chat=False,
    where="--guide-api-base",
    role="guide",
):
    """A model behind an OpenAI-compatible /v1/completions endpoint (raw prompt in, text out; chat:
    /v1/chat/completions, the prompt as one user message, the judge of tasks/summarize.py). One request per state,
    `workers` at a time; the client retries with backoff and times out; the key comes from $OPENAI_API_KEY (never from a
    flag, so never in args.json or the logs). Each request carries a seed drawn from torch's random stream (a server
    that honours seeds then repeats a run)."""
    try:
        import openai
    except ImportError:
        raise UserError(
            "a served guide (--guide-name openai:MODEL) needs the openai package: pip install openai"
        ) from None
    check(
        api_base,
        f"--guide-name openai:{model} needs --guide-api-base, the URL of the server (e.g. http://127.0.0.1:8000/v1)",
    )
    url = urllib.parse.urlparse(api_base)
    check(url.scheme in ("http", "https") and url.hostname, f"{where} {api_base}: not an http(s) URL of a server")
    client = openai.OpenAI(
        base_url=api_base, api_key=os.environ.get("OPENAI_API_KEY", "none"), timeout=timeout, max_retries=retries
    )
    refused = f"{where} {api_base}: the {role}'s server"

    def one(text, max_tokens, seed):
        sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        try:
            if chat:
                messages = [{"role": "user", "content": text}]
                choice = client.chat.completions.create(model=model, messages=messages, **sampling).choices[0]
                answer = choice.message.content if choice.message.content is not None else ""
            else:
                choice = client.completions.create(model=model, prompt=text, **sampling).choices[0]
                answer = choice.text
        except (openai.APIConnectionError, openai.APIStatusError):
            raise
        except (openai.OpenAIError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
            raise UserError(f"{refused} gave no completion one can read ({type(e).__name__}: {e})") from None
        check(isinstance(answer, str), f"{refused} answered a completion without text ({answer!r})")
        return answer, choice.finish_reason == "stop"  # an empty text is an answer: the model chose to stop

    def ask(texts, max_tokens, seeds):
        try:
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                return list(pool.map(one, texts, max_tokens, seeds))
        except openai.APIConnectionError as e:
            raise UserError(f"{refused} cannot be reached ({e.__class__.__name__}: {e})") from None
        except openai.APIStatusError as e:
            raise UserError(f"{refused} refused the request (HTTP {e.status_code}: {e.message})") from None

    def complete(texts, max_tokens):
        return ask(texts, max_tokens, torch.randint(2**31 - 1, (len(texts),)).tolist())

    complete.probe = lambda: ask(["The"], [1], [0])  # one request, before the run starts: the server answers
    return complete


def seam_stats(guide):
    """For a guide that continues text: {rlgf/guide_seam_retokenized: the share of restart states, since the last call
    and over all processes, whose kept prefix + the guide's continuation differ from the tokens of the two as one
    text (the tokenization changes, the text does not); rlgf/guide_seam_text_changed: the share whose text no
    tokenization could keep}. {} for a guide that continues token ids."""
    seam = getattr(guide, "seam", None)
    if seam is None:
        return {}
    counts = total(torch.tensor([seam["states"], seam["retokenized"], seam["text_changed"]], device=device_of("auto")))
    seam.update(states=0, retokenized=0, text_changed=0)
    states = counts[0].clamp(min=1)
    return {
        "rlgf/guide_seam_retokenized": (counts[1] / states).item(),
        "rlgf/guide_seam_text_changed": (counts[2] / states).item(),
    }
