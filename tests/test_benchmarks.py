"""The benchmark scripts run end to end on the tiny assets and print/write their figures."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


def tiny_flags(tiny):
    return ["--task", "imdb", "--dataset-name", tiny["imdb"], "--model-name", tiny["lm"], "--reward-model-name",
            tiny["classifier"], "--eval-lm-name", tiny["lm"], "--prompt-len", "8", "--max-new-tokens", "6",
            "--min-new-tokens", "6", "--device", "cpu"]


def test_study_writes_the_table(tiny, tmp_path):
    out = tmp_path / "study"
    subprocess.run([sys.executable, "benchmark/study.py", "--task", "imdb", "--output", str(out), "--seeds", "2", "--num-iterations", "2",
                    "--rollouts-per-iteration", "4", "--eval-every", "1", "--eval-size", "8", "--parallel", "2",
                    "--sft-epochs", "0.5", "--", *tiny_flags(tiny)[2:]], cwd=ROOT, check=True, capture_output=True, text=True)
    results = json.load(open(out / "results.json"))
    assert list(results["rows"]) == ["zero-shot", "SFT", "guide (SFT + nucleus)", "ppo", "ppo_pp", "aggrevated", "lols", "d2lols"]
    assert all(len(results["rows"][a]["eval/reward"]) == 2 for a in ("ppo", "d2lols"))
    assert [e for e, _ in results["curves"]["ppo"][0]] == [0, 4, 8]
    table = open(out / "table.md").read()
    assert "| d2lols |" in table and "±" in table


def test_overhead_prints_ratios(tiny):
    done = subprocess.run([sys.executable, "benchmark/overhead.py", "--scripts", "ppo", "ppo_pp", "--iterations", "2", "--",
                           *tiny_flags(tiny), "--rollouts-per-iteration", "4", "--minibatch-size", "4"],
                          cwd=ROOT, check=True, capture_output=True, text=True)
    header, *lines = done.stdout.strip().splitlines()
    assert "(median of 1 iterations)" in header  # 2 iterations, the first dropped as warm-up
    table = {name: (float(it), float(gen), float(ratio.rstrip("x"))) for name, it, gen, ratio in map(str.split, lines)}
    assert list(table) == ["ppo", "ppo_pp"]
    for name, (iteration_s, generate_s, ratio) in table.items():
        assert 0 < generate_s < iteration_s  # generation is part of an iteration
        assert ratio == pytest.approx(iteration_s / table["ppo"][0], rel=0.02, abs=0.006)  # to the first script (printed rounded)
