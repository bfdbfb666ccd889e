"""Runs one algorithm script on the tiny test assets in every process of `accelerate launch` (or in plain python), for
tests/test_parallel.py.

    python tests/parallel.py SCRIPT ARGS_JSON [--fixed-episodes] [--stop-after-checkpoint]

ARGS_JSON: the tiny assets' paths and the flags to override (conftest.tiny_args).
--fixed-episodes: the global batch no longer depends on the number of processes: the script's prompts are one fixed
    draw of which each process takes its share, and each response is a function of its prompt's tokens (of varying
    lengths, so that the processes hold different token counts). 1 and 2 processes then train on the same episodes.
--stop-after-checkpoint: every process stops (exit status 3) right after the first checkpoint is written."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

import common  # noqa: E402
from conftest import script, tiny_args  # noqa: E402
from plumbing import parallel, runs  # noqa: E402


def fixed_episodes(name):
    rank, count = parallel.processes()
    randint = torch.randint

    def shared_randint(high, size, *args, **kwargs):
        caller = sys._getframe(1)
        if caller.f_code.co_name != "main" or caller.f_globals["__name__"] != name:  # only the script's draw of prompts
            return randint(high, size, *args, **kwargs)
        draw = randint(high, (size[0] * count,), generator=torch.Generator().manual_seed(0))
        return draw[rank * size[0] : (rank + 1) * size[0]]

    def episodes(samplers, query, query_mask, rollin_by, rollout_by, max_new_tokens, min_new_tokens, rng, tokenizer):
        key = (query * query_mask).sum(1)
        t = torch.arange(max_new_tokens)
        response_mask = t[None] < (2 + key % (max_new_tokens - 1))[:, None]
        response = torch.where(response_mask, (key[:, None] * 7 + t[None] * 13) % 30 + 2, tokenizer.pad_token_id)
        return dict(
            response=response,
            response_mask=response_mask,
            by_guide=torch.zeros_like(response_mask),
            restart_at=torch.zeros(len(query), dtype=torch.long),
            short_rollin=torch.zeros(len(query), dtype=torch.bool),
        )

    torch.randint = shared_randint
    common.generate_with_restarts = episodes


def stop_after_checkpoint():
    save = runs.save_checkpoint

    def save_then_stop(*args):
        save(*args)
        sys.exit(3)

    runs.save_checkpoint = save_then_stop


if __name__ == "__main__":
    name, values = sys.argv[1], json.loads(sys.argv[2])
    if "--fixed-episodes" in sys.argv:
        fixed_episodes(name)
    if "--stop-after-checkpoint" in sys.argv:
        stop_after_checkpoint()
    module = script(name)
    module.main(tiny_args(module, values.pop("tiny"), values.pop("output_dir"), **values))
