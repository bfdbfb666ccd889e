"""Data parallel training under `accelerate launch --multi_gpu --num_processes 2` on a machine without a GPU (2 gloo
processes on the CPU; accelerate's own --cpu flag would start one process): the update equals the
one-process update of the same global batch, every script runs, resume continues exactly, only the main process
writes. The processes are launched by tests/parallel.py."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from test_cli import cli

LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "--multi_gpu",
]  # on a machine without a GPU: gloo processes on the CPU


def launch(processes, name, tiny, output_dir, *options, expect=0, **flags):
    """Run tests/parallel.py in `processes` processes; returns the run directory made under output_dir."""
    values = json.dumps(dict(tiny=tiny, output_dir=str(output_dir), **flags))
    command = [*LAUNCH, "--num_processes", str(processes)] if processes > 1 else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = subprocess.run(
        [*command, os.path.join(ROOT, "tests", "parallel.py"), name, values, *options],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == expect or (expect and out.returncode != 0), out.stdout[-3000:] + out.stderr[-3000:]
    (run_dir,) = [os.path.join(output_dir, d) for d in os.listdir(output_dir)]
    return run_dir


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


STATS = (
    "train/reward",
    "train/kl",
    "train/response_length",
    "policy/entropy",
    "critic/explained_variance",
    "loss/policy",
    "loss/value",
    "loss/mle",
    "policy/clipfrac",
    "policy/approx_kl",
    "grad_norm",
    "eval/reward",
    "eval/kl",
    "eval/perplexity",
    "eval/output_perplexity",
)


@pytest.mark.parametrize("name", ["ppo", "grpo", "ppo-separate-critic"])
def test_two_processes_update_as_one_process_does(name, tiny, tmp_path):
    """The same global batch of episodes (tests/parallel.py --fixed-episodes: responses of unequal lengths, so the
    processes hold different token counts) trained by 1 process and by 2 (each with half of every minibatch, in two
    micro-batches): the parameters after the updates and every logged training statistic agree to float precision, and
    so does the evaluation after them (greedy, --top-k 1, on 6 prompts split 3 + 3). Whitening, token means and
    statistics over one process's share instead of the global batch, gradients not averaged, or an evaluation of the
    main process's share alone break it."""
    flags = dict(
        num_iterations=1,
        rollouts_per_iteration=8,
        minibatch_size=8,
        ppo_epochs=2,
        gradient_accumulation_steps=2,
        mle_coef=0.1,
        learning_rate=3e-3,
        save_every=1,
        eval_size=6,
        max_new_tokens=6,
        min_new_tokens=0,
        top_k=1,
    )
    if name == "grpo":
        flags["group_size"] = 2
    files, tolerance = ["model.safetensors"], 1e-6
    if name == "ppo-separate-critic":  # LoRA: the critic's adapter beside the policy's, both averaged over processes
        name, files = "ppo", ["adapter_model.safetensors", "critic/adapter_model.safetensors"]
        flags.update(lora_r=4, lora_alpha=8.0, critic="separate")
        tolerance = 1e-5  # Adam's first steps on adapters that start at 0 divide tiny gradients by tiny roots
    one = launch(1, name, tiny, tmp_path / "one", "--fixed-episodes", **flags)
    two = launch(2, name, tiny, tmp_path / "two", "--fixed-episodes", **flags)
    streams = lambda d: torch.load(os.path.join(d, "checkpoint", "training_state.pt"), weights_only=True)["streams"]  # noqa: E731
    assert len(streams(one)) == 1 and len(streams(two)) == 2  # one and two processes did run
    a, b = rows(one)[1], rows(two)[1]
    for key in STATS:
        if key in a or key.startswith("eval/"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=tolerance), key
    for file in files:
        weights_one, weights_two = (load_file(os.path.join(d, "checkpoint", file)) for d in (one, two))
        start = load_file(os.path.join(tiny["lm"], "model.safetensors")) if file == "model.safetensors" else {}
        moved = 0
        for key, value in weights_one.items():
            torch.testing.assert_close(
                weights_two[key], value, rtol=1e-4, atol=2e-5
            )  # Adam: tiny gradients / tiny roots
            moved += (
                not torch.equal(start[key], value) if key in start else value.abs().sum() > 0
            )  # LoRA's B starts at 0
        assert moved > 0  # the update did change the weights


@pytest.mark.parametrize("name", ["ppo", "ppo_pp", "aggrevated", "lols", "d2lols", "grpo", "grpo_pp"])
def test_every_script_runs_under_accelerate_launch(name, tiny, tmp_path):
    """Two processes, two iterations with restarts from the guide: one run directory, written by the main process only
    (one row per iteration, finite training figures, the evaluation over all prompts), and its checkpoint."""
    flags = dict(num_iterations=2, eval_every=2, save_every=2, guide_name=tiny["lm2"], beta=0.5, lr_schedule="linear")
    if name.startswith("grpo"):
        flags["group_size"] = 2
    run_dir = launch(2, name, tiny, tmp_path, **flags)
    logged = rows(run_dir)
    assert [r["iteration"] for r in logged] == [0, 1, 2] and [r["episodes"] for r in logged] == [0, 8, 16]
    # each process made the planned updates (2 epochs x 8 / 4 minibatches per iteration) and no more: halfway, then 0
    assert logged[1]["lr"] == pytest.approx(0.5e-3) and logged[2]["lr"] == 0.0
    assert all(isinstance(logged[1][k], float) for k in ("train/reward", "train/kl", "loss/policy", "grad_norm"))
    with open(os.path.join(run_dir, "samples.jsonl")) as f:
        assert len(f.readlines()) == 8  # 4 samples at each of the 2 evaluations: the main process's alone
    assert os.path.isfile(os.path.join(run_dir, "checkpoint", "training_state.pt"))
    state = torch.load(os.path.join(run_dir, "checkpoint", "training_state.pt"), weights_only=True)
    assert len(state["streams"]) == 2 and not torch.equal(
        state["streams"][0]["torch_rng"], state["streams"][1]["torch_rng"]
    )


def test_resume_with_two_processes_continues_exactly(tiny, tmp_path):
    """A 2-process run stopped after its first checkpoint and resumed by 2 processes logs what the uninterrupted
    2-process run logs (each process's random streams are saved); resuming it with 1 process is refused in one line."""
    flags = dict(num_iterations=3, save_every=1, guide_name=tiny["lm2"], beta=0.5, lr_schedule="linear")
    straight = launch(2, "ppo_pp", tiny, tmp_path / "straight", **flags)
    stopped = launch(2, "ppo_pp", tiny, tmp_path / "stopped", "--stop-after-checkpoint", expect=3, **flags)
    assert [r["iteration"] for r in rows(stopped)] == [0, 1]
    launch(2, "ppo_pp", tiny, tmp_path / "stopped", resume=stopped, **flags)
    timeless = lambda rs: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rs]  # noqa: E731
    assert timeless(rows(stopped)) == timeless(rows(straight))
    out, _ = cli("ppo_pp.py", "--resume", stopped)
    assert out.returncode == 2 and "made by 2 process(es)" in out.stderr and "Traceback" not in out.stderr


def test_a_minibatch_the_processes_cannot_share_is_one_line(tmp_path):
    """--minibatch-size 4 with --gradient-accumulation-steps 4 cannot be split among 2 processes: one line in each
    process, before any model loads, no traceback through this project's code (the launcher adds its own report of
    the failed processes), and the launch fails."""
    out = subprocess.run(
        [
            *LAUNCH,
            "--num_processes",
            "2",
            "ppo.py",
            "--minibatch-size",
            "4",
            "--gradient-accumulation-steps",
            "4",
            "--output-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    ours = [  # the project's own lines of a traceback (not a package's: the venv may lie inside the checkout)
        line
        for line in out.stderr.splitlines()
        if line.strip().startswith(f'File "{ROOT}') and "site-packages" not in line
    ]
    assert out.returncode != 0 and not ours, out.stderr[-2000:]
    message = "error: --minibatch-size must be a multiple of the 2 processes x --gradient-accumulation-steps 4"
    assert out.stderr.count(message) == out.stderr.count("error: ") == 2, out.stderr[
        -2000:
    ]  # the two may interleave on one line
