"""The benchmark scripts run end to end on the tiny assets and print/write their figures."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT


def tiny_flags(tiny):
    return [
        "--task",
        "imdb",
        "--dataset-name",
        tiny["imdb"],
        "--model-name",
        tiny["lm"],
        "--reward-model-name",
        tiny["classifier"],
        "--eval-lm-name",
        tiny["lm"],
        "--prompt-len",
        "8",
        "--max-new-tokens",
        "6",
        "--min-new-tokens",
        "6",
        "--device",
        "cpu",
    ]


def test_study_t_quantile_and_paired_interval():
    """The two-sided 95% critical values of Student's t (any table), and an interval computed by hand: differences
    1, 2, 3, 6 have mean 3 and std sqrt(14/3), so the interval is 3 +- 3.182 x sqrt(14/3) / 2 (t with 3 degrees of
    freedom)."""
    from benchmark import study

    assert [round(study.t_quantile(df), 3) for df in (1, 2, 4, 10, 30, 10**6)] == [
        12.706,
        4.303,
        2.776,
        2.228,
        2.042,
        1.960,
    ]
    d = study.paired_difference([2.0, 4.0, 6.0, 12.0], [1.0, 2.0, 3.0, 6.0])
    half = 3.18245 * (14 / 3) ** 0.5 / 2
    assert d["per_seed"] == [1.0, 2.0, 3.0, 6.0] and d["mean"] == 3.0
    assert d["low"] == pytest.approx(3 - half, abs=1e-4) and d["high"] == pytest.approx(3 + half, abs=1e-4)


def final_evals(runs):
    """Every final_eval*.json under a study's runs directory: {file relative to runs: its content}."""
    return {str(path.relative_to(runs)): json.load(open(path)) for path in sorted(runs.rglob("final_eval*.json"))}


def test_study_writes_the_table(tiny, tmp_path):
    """Run from another folder with a relative --output that has a space: the table records the command as typed.
    --eval-split test goes to sft.py and every run. Every row is a final evaluation on the same 10 test prompts with the
    same sampling seed; the runs' checkpoints are gone after it, the SFT checkpoint stays; a second invocation reuses
    all."""
    out = tmp_path / "my study"
    argv = [
        "--task",
        "imdb",
        "--output",
        "my study",
        "--seeds",
        "2",
        "--num-iterations",
        "2",
        "--rollouts-per-iteration",
        "7",
        "--eval-every",
        "1",
        "--eval-size",
        "8",
        "--parallel",
        "2",
        "--sft-epochs",
        "0.5",
        "--eval-split",
        "test",
        "--final-eval-size",
        "10",
        "--",
        *tiny_flags(tiny)[2:],
    ]
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmark", "study.py"), *argv],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    )
    results = json.load(open(out / "results.json"))
    assert (
        results["command"] == shlex.join(["python", "benchmark/study.py", *argv])
        and results["args"]["output"] == "my study"
    )
    assert list(results["rows"]) == [
        "zero-shot",
        "SFT",
        "guide (SFT + nucleus)",
        "ppo",
        "ppo_pp",
        "aggrevated",
        "lols",
        "d2lols",
    ]
    assert all(len(results["rows"][a]["eval/reward"]) == 2 for a in ("ppo", "d2lols"))
    assert [e for e, _, _ in results["curves"]["ppo"][0]] == [0, 7, 14]  # a multiple of imdb's minibatch of 7 episodes
    assert all(kl >= 0 for _, _, kl in results["curves"]["d2lols"][1]) and results["reused_runs"] == []

    # the final evaluations: 3 of the SFT run (zero-shot, SFT, guide) and one per run, all alike; the rows are theirs
    runs = out / "runs"
    evals = final_evals(runs)
    assert len(evals) == 3 + 10 and all(
        e["split"] == "test" and e["prompts"] == 10 and e["seed"] == 0 for e in evals.values()
    )
    assert len({e["prompts_sha256"] for e in evals.values()}) == 1 and results["final_eval"]["prompts"] == 10
    for algorithm in ("ppo", "lols"):  # (the tiny runs barely move: their rewards agree, their perplexities differ)
        per_seed = [
            e["metrics"] for name, e in evals.items() if name.split(os.sep)[0] in (f"{algorithm}_1", f"{algorithm}_2")
        ]
        assert results["rows"][algorithm] == {
            k: [m[k] for m in per_seed] for k in ("eval/reward", "eval/perplexity", "eval/output_perplexity")
        }
    sft = next(e for name, e in evals.items() if name.endswith("final_eval_sft.json"))
    guide = next(e for name, e in evals.items() if name.endswith("final_eval_guide.json"))
    assert sft["metrics"]["eval/kl"] == 0 and (sft["sampling"], guide["sampling"]) == ("policy", "guide")
    assert results["rows"]["SFT"]["eval/reward"] == [sft["metrics"]["eval/reward"]]
    diff = results["differences_from_ppo"]["d2lols"]["eval/perplexity"]  # paired by seed
    assert diff["per_seed"] == [
        d - p for d, p in zip(results["rows"]["d2lols"]["eval/perplexity"], results["rows"]["ppo"]["eval/perplexity"])
    ]
    assert "ppo" not in results["differences_from_ppo"] and diff["low"] <= diff["mean"] <= diff["high"]

    # checkpoints: every run's is gone, the SFT's stays
    assert [str(p.relative_to(runs)).split(os.sep)[0] for p in runs.rglob("checkpoint")] == ["sft"]

    table = open(out / "table.md").read()
    assert "| d2lols |" in table and "±" in table
    assert table.startswith(
        "Final evaluation of every row on 10 prompts of the test split, sampling seed 0, the same for every row"
    )
    cells = [
        f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
        for d in results["differences_from_ppo"]["d2lols"].values()
    ]
    assert "Difference from ppo, paired by seed" in table and "| d2lols | " + " | ".join(cells) + " |" in table
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert f"Commit: {head}" in table and results["commit"].startswith(head)  # the code that produced it
    for parent in ("sft", "ppo_1", "d2lols_2"):
        (run,) = [d for d in (runs / parent).iterdir() if d.is_dir()]
        assert json.load(open(run / "args.json"))["eval_split"] == "test"
    assert (
        "Command: `python benchmark/study.py --task imdb --output 'my study' --seeds 2" in table
        and str(out) not in table
    )
    times = {p: p.stat().st_mtime_ns for p in runs.rglob("final_eval*.json")}
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmark", "study.py"), *argv],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    again = json.load(
        open(out / "results.json")
    )  # a second invocation reuses every run and every final evaluation, and says so
    assert again["rows"] == results["rows"] and len(again["reused_runs"]) == 11
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("final_eval*.json")} == times
    table = open(out / "table.md").read()
    assert "(11 of its 11 runs reused from an earlier invocation)" in table
    assert "s (this invocation's only: not the reused runs')" in table  # its wall time is not the study's

    # a study killed midway: ppo_2's run was cut short (no final evaluation, no checkpoint); the next invocation runs it
    # again
    (cut,) = [d for d in (runs / "ppo_2").iterdir() if d.is_dir()]
    (cut / "final_eval.json").unlink()
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmark", "study.py"), *argv],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    third = json.load(open(out / "results.json"))
    assert len(third["reused_runs"]) == 10 and "ppo_2" not in third["reused_runs"]
    (rerun,) = [d for d in (runs / "ppo_2").iterdir() if d.is_dir()]
    assert (rerun / "final_eval.json").is_file() and not (rerun / "checkpoint").exists()


def test_overhead_prints_ratios(tiny):
    done = subprocess.run(
        [
            sys.executable,
            "benchmark/overhead.py",
            "--scripts",
            "ppo",
            "ppo_pp",
            "--iterations",
            "2",
            "--",
            *tiny_flags(tiny),
            "--rollouts-per-iteration",
            "4",
            "--minibatch-size",
            "4",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    header, *lines = done.stdout.strip().splitlines()
    assert "(median of 1 iterations)" in header  # 2 iterations, the first dropped as warm-up
    table = {name: (float(it), float(gen), float(ratio.rstrip("x"))) for name, it, gen, ratio in map(str.split, lines)}
    assert list(table) == ["ppo", "ppo_pp"]
    for name, (iteration_s, generate_s, ratio) in table.items():
        assert 0 < generate_s < iteration_s  # generation is part of an iteration
        base, half = table["ppo"][0], 0.0005  # times printed to 3 decimals, ratios to 2: bound the rounding
        assert (iteration_s - half) / (base + half) - 0.005 <= ratio <= (iteration_s + half) / (base - half) + 0.005


def test_trunk_gradients_splits_the_loss(tiny, tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "benchmark/trunk_gradients.py",
            "--script",
            "aggrevated",
            "--",
            *tiny_flags(tiny),
            "--num-iterations",
            "1",
            "--rollouts-per-iteration",
            "8",
            "--minibatch-size",
            "4",
            "--vf-coef",
            "30",
            "--ppo-epochs",
            "1",
            "--eval-every",
            "0",
            "--eval-size",
            "4",
            "--output-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    lines = done.stdout.strip().splitlines()[-6:]
    assert "over 2 minibatch steps; vf_coef 30.0" in lines[0]
    norms = {line[:22].strip(): float(line[22:].split()[0]) for line in lines[2:]}
    assert list(norms) == ["policy loss", "value loss x vf_coef", "MLE x mle_coef", "all terms"]
    assert all(v > 0 for v in norms.values())
    assert norms["all terms"] <= 1.0001 * (
        norms["policy loss"] + norms["value loss x vf_coef"] + norms["MLE x mle_coef"]
    )


def test_memory_prints_both_variants(tiny, tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "benchmark/memory.py",
            "--script",
            "ppo_pp",
            "--lora-r",
            "4",
            "--",
            *tiny_flags(tiny),
            "--rollouts-per-iteration",
            "4",
            "--minibatch-size",
            "4",
            "--eval-size",
            "4",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    lines = done.stdout.strip().splitlines()
    assert lines[1].split()[0] == "variant"
    peaks = {line[:20].strip(): line[20:].split() for line in lines[2:]}
    assert list(peaks) == ["full fine-tuning", "LoRA r 4"]
    assert all(0.05 < float(rss) < 64 and gpu == "-" for rss, gpu in peaks.values())


def test_study_compares_the_chosen_algorithms(tiny, tmp_path):
    """--algorithms; --keep-checkpoints keeps the runs' checkpoints; --final-eval-size 0 is the whole split and
    --final-eval-seed the seed of every row, and evaluating a checkpoint again with those settings gives its figures."""
    argv = [
        "--task",
        "imdb",
        "--output",
        str(tmp_path / "out"),
        "--algorithms",
        "grpo",
        "grpo_pp",
        "--seeds",
        "1",
        "--num-iterations",
        "1",
        "--eval-every",
        "1",
        "--eval-size",
        "4",
        "--sft-epochs",
        "0.25",
        "--keep-checkpoints",
        "--final-eval-seed",
        "5",
        "--",
        *tiny_flags(tiny)[2:],
    ]  # imdb's 28 episodes: 7 groups of 4
    done = subprocess.run([sys.executable, "benchmark/study.py", *argv], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.load(open(tmp_path / "out" / "results.json"))
    assert list(results["rows"]) == ["zero-shot", "SFT", "guide (SFT + nucleus)", "grpo", "grpo_pp"]
    assert results["differences_from_ppo"] == {}  # no ppo among the algorithms
    runs = tmp_path / "out" / "runs"
    assert sorted(str(p.relative_to(runs)).split(os.sep)[0] for p in runs.rglob("checkpoint")) == [
        "grpo_1",
        "grpo_pp_1",
        "sft",
    ]
    evals = final_evals(runs)
    assert len(evals) == 5 and all(
        e["split"] == "validation" and e["prompts"] == 24 and e["seed"] == 5 for e in evals.values()
    )  # tiny imdb: 24
    (grpo_eval,) = [e for name, e in evals.items() if name.startswith("grpo_1")]
    sft_checkpoint = grpo_eval["reference"]
    again = tmp_path / "again.json"
    subprocess.run(
        [
            sys.executable,
            "benchmark/final_eval.py",
            "--task",
            "imdb",
            *tiny_flags(tiny)[2:],
            "--model-name",
            grpo_eval["model"],
            "--reference",
            sft_checkpoint,
            "--seed",
            "5",
            "--out",
            str(again),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    assert json.load(open(again)) == grpo_eval
    bad = subprocess.run(
        [sys.executable, "benchmark/study.py", "--algorithms", "ppo", "sac"], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "unknown algorithm(s) sac" in bad.stderr


def test_study_zero_shot_start_and_paired_variants(tiny, tmp_path):
    """--start zero-shot: every run starts from the zero-shot model (--model-name), the guided ones with the SFT
    checkpoint as their guide, and eval/kl is from the zero-shot model. --variants: a row per SCRIPT:FLAG=VALUE, run
    with the same seeds and paired with PPO's; the variant's flag reaches its runs and only them."""
    out = tmp_path / "out"
    argv = [
        *("--task", "imdb", "--output", str(out), "--algorithms", "ppo", "--seeds", "2"),
        *("--num-iterations", "1", "--eval-every", "1", "--eval-size", "4", "--sft-epochs", "0.25"),
        *("--final-eval-size", "6", "--start", "zero-shot", "--variants", "ppo_pp:beta=0.9", "d2lols:alpha=1"),
        *("--", *tiny_flags(tiny)[2:]),
    ]
    done = subprocess.run([sys.executable, "benchmark/study.py", *argv], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.load(open(out / "results.json"))
    rows = ["zero-shot", "SFT", "guide (SFT + nucleus)", "ppo", "ppo_pp beta=0.9", "d2lols alpha=1"]
    assert list(results["rows"]) == rows
    assert list(results["differences_from_ppo"]) == rows[4:]
    ppo = results["rows"]["ppo"]["eval/reward"]
    for row in rows[4:]:
        diff = results["differences_from_ppo"][row]["eval/reward"]
        assert diff["per_seed"] == pytest.approx([v - b for v, b in zip(results["rows"][row]["eval/reward"], ppo)])
    runs = out / "runs"
    (sft,) = [p for p in (runs / "sft").iterdir() if p.is_dir()]
    checkpoint = str(sft / "checkpoint")

    def args_of(parent):
        (run_dir,) = [p for p in (runs / parent).iterdir() if p.is_dir()]
        return json.load(open(run_dir / "args.json"))

    for parent in ("ppo_1", "ppo_pp-beta-0.9_1", "d2lols-alpha-1_2"):
        assert args_of(parent)["model_name"] == tiny["lm"]  # the zero-shot model
    for parent in ("ppo_pp-beta-0.9_1", "d2lols-alpha-1_2"):
        assert args_of(parent)["guide_name"] == checkpoint
    assert args_of("ppo_pp-beta-0.9_2")["beta"] == 0.9 and "beta" not in args_of("ppo_2")
    assert args_of("d2lols-alpha-1_1")["alpha"] == 1
    assert all(e["reference"] == tiny["lm"] for e in final_evals(runs).values())
    bad = subprocess.run(
        [sys.executable, "benchmark/study.py", "--algorithms", "ppo_pp", "--variants", "ppo_pp:beta=0.5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "keep ppo in --algorithms" in bad.stderr


def test_profile_times_every_phase(tiny, tmp_path):
    """benchmark/profile_phases.py: a table and JSON of the median timed iteration's phases; PPO has no rollin,
    AggreVaTeD rolls in with pi_theta on every sample, and the phases add up to the iteration."""
    out = tmp_path / "profile.json"
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmark", "profile_phases.py"),
            "--shapes",
            "smollm2",
            "--scripts",
            "ppo",
            "aggrevated",
            "--iterations",
            "3",
            "--eval-size",
            "8",
            "--json-out",
            str(out),
            "--",
            *tiny_flags(tiny),
            "--rollouts-per-iteration",
            "8",
            "--minibatch-size",
            "4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rollin" in done.stdout and "decode tok/s" in done.stdout and "aggrevated" in done.stdout
    results = json.load(open(out))
    ppo, aggrevated = results["smollm2/ppo"], results["smollm2/aggrevated"]
    assert ppo["rollin"] == 0 and ppo["rollout"] > 0 and aggrevated["rollin"] > 0 and aggrevated["rollout"] > 0
    for r in (ppo, aggrevated):
        assert all(r[p] > 0 for p in ("reward", "old_ref_forward", "update", "evaluation")) and r["peak_memory_gib"] > 0
        assert r["rollin"] + r["rollout"] + r["reward"] + r["old_ref_forward"] + r["update"] == pytest.approx(
            r["iteration"]
        )
        assert r["decode_tokens_per_s"] > 0 and r["timed_iterations"] == 2


def test_decoding_compares_three_ways():
    """benchmark/decoding.py: generate, the plain loop and the static-cache loop on the same states, ratios to
    generate."""
    done = subprocess.run(
        [
            sys.executable,
            "benchmark/decoding.py",
            "--layers",
            "1",
            "--batch",
            "4",
            "--prompt-len",
            "8",
            "--prefix-len",
            "3",
            "--new-tokens",
            "4",
            "--warmup",
            "1",
            "--repeats",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()[-3:]
    assert [line.split("  ")[0] for line in lines] == [
        "generate (dynamic cache)",
        "decoding.sample",
        "decoding.sample_static",
    ]
    ms, ratios = [float(line.split()[-3]) for line in lines], [float(line.split()[-1].rstrip("x")) for line in lines]
    assert ratios[0] == 1.0 and all(m > 0 for m in ms)
    assert ratios[2] == pytest.approx(ms[0] / ms[2], rel=0.02, abs=0.01)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["benchmark/study.py", "--final-eval-size", "-1"], "--final-eval-size >= 0"),
        (["benchmark/study.py", "--seeds", "0"], "--seeds must be >= 1"),
        (["benchmark/profile_phases.py", "--iterations", "1"], "--iterations must be >= 2"),
        (["benchmark/decoding.py", "--batch", "0"], "--batch, --prompt-len"),
    ],
)
def test_benchmarks_reject_bad_values_in_one_line(argv, message):
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
