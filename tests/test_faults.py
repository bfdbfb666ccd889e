"""Nothing lost, round two: a run owns its directory (two at once never share one; a second --resume of a running run
is refused), a weight made non-finite is never saved or logged, a served guide that answers badly stops the run
before it starts, a classifier that would start random is refused, no file is unpickled with code in it, malformed
files and bad values end in one line, and a study's children end with it. Real processes where the fault lies
between processes: two runs, a kill, a server on 127.0.0.1."""

import errno
import http.server
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import ROOT, run, tiny_args
from plumbing import UserError, runs
from test_runs import command_line, digest, one_line


def ppo(*argv, wait=True):
    """python ppo.py ARGV as a process: its result, or the process itself (wait=False)."""
    command = [sys.executable, "ppo.py", *argv]
    if wait:
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------------------------
# A run owns its directory
# ---------------------------------------------------------------------------------------------------------------
def test_runs_started_in_the_same_second_get_their_own_directories(tiny, tmp_path, monkeypatch):
    """The clock stands still: the second run of the same name gets "..._2", never the first's directory; both
    processes of a sweep launched at once keep their own records and rows."""
    monkeypatch.setattr(runs.time, "time", lambda: 1_700_000_000.0)
    module = __import__("ppo")
    args = tiny_args(module, tiny, tmp_path / "same")
    first, second = runs.run_dir(args), runs.run_dir(args)
    assert second == first + "_2" and os.path.isdir(first) and os.path.isdir(second)
    monkeypatch.undo()
    out = tmp_path / "sweep"
    processes = [
        ppo(*command_line(tiny, out), "--num-iterations=1", f"--learning-rate={lr}", wait=False) for lr in (1e-3, 5e-4)
    ]
    for p in processes:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-2000:]
    dirs = sorted(os.path.join(out, d) for d in os.listdir(out))
    assert len(dirs) == 2
    rates = sorted(json.load(open(os.path.join(d, "args.json")))["learning_rate"] for d in dirs)
    assert rates == [5e-4, 1e-3] and all([r["iteration"] for r in rows(d)] == [0, 1] for d in dirs)


def test_a_second_resume_of_a_running_run_is_refused(tiny, tmp_path):
    """While one process continues a run (--resume), another --resume of the same directory stops in one line
    naming the first's pid; the first ends normally and every iteration is logged once."""
    out = tmp_path / "runs"
    done = ppo(*command_line(tiny, out), "--num-iterations=1", "--save-every=1")
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = [os.path.join(out, d) for d in os.listdir(out)]
    first = ppo("--resume", run_dir, "--num-iterations", "30", wait=False)
    lock = os.path.join(run_dir, "run.lock")
    deadline = time.time() + 300
    while not (os.path.isfile(lock) and open(lock).read().strip() == str(first.pid)):
        assert time.time() < deadline and first.poll() is None, first.stderr.read() if first.poll() is not None else ""
        time.sleep(0.2)
    second = ppo("--resume", run_dir, "--num-iterations", "30")
    one_line(second, f"another process (pid {first.pid}) is running this run")
    assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    assert [r["iteration"] for r in rows(run_dir)] == list(range(31))


# ---------------------------------------------------------------------------------------------------------------
# No weights poisoned
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ppo", "grpo_pp"])
def test_non_finite_weights_are_never_saved_or_logged(tiny, tmp_path, monkeypatch, name):
    """An update that leaves one weight non-finite (here: AdamW's last step of iteration 2 made to write an inf) stops
    the run in one line before that iteration is logged or saved: the iteration-1 checkpoint is as a 1-iteration run
    leaves it."""
    run(name, tiny, tmp_path / "one", num_iterations=1, save_every=1, eval_size=4)
    (one,) = [os.path.join(tmp_path / "one", d) for d in os.listdir(tmp_path / "one")]
    step, calls = torch.optim.AdamW.step, []

    def poisoned_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        calls.append(1)
        if (
            len(calls) == 8
        ):  # iteration 2's last step (4 an iteration: 8 episodes, minibatches of 4, 2 epochs): no later
            # loss of that iteration sees it, only the check of the weights does
            self.param_groups[0]["params"][0].data.view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    with pytest.raises(UserError, match=r"^iteration 2: 1 weights are non-finite after the update; stopped"):
        run(name, tiny, tmp_path / "inf", num_iterations=3, save_every=1, eval_size=4)
    (inf,) = [os.path.join(tmp_path / "inf", d) for d in os.listdir(tmp_path / "inf")]
    assert [r["iteration"] for r in rows(inf)] == [0, 1]
    for file in ("model.safetensors", "training_state.pt"):
        assert digest(os.path.join(inf, "checkpoint", file)) == digest(os.path.join(one, "checkpoint", file))


def test_a_non_finite_evaluation_reward_stops_the_run(tiny, tmp_path, monkeypatch):
    """A NaN reward in an evaluation stops the run like one in training (decided: an evaluation that cannot be scored
    is not logged as null and passed over); other non-finite evaluation figures are logged as null."""
    import tasks

    reward = tasks.load_reward

    def poisoned(*args):
        scorer = reward(*args)
        return lambda prompts, generations: (
            scorer(prompts, generations) * (float("nan") if len(generations) == 4 else 1)
        )

    monkeypatch.setattr(tasks, "load_reward", poisoned)
    with pytest.raises(UserError, match=r"^iteration 0: the evaluation's reward is nan; stopped"):
        run("ppo", tiny, tmp_path, num_iterations=1, eval_size=4)


# ---------------------------------------------------------------------------------------------------------------
# A served guide that answers badly, on 127.0.0.1
# ---------------------------------------------------------------------------------------------------------------
class Answers(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that answers every completion request with the body it was set to."""

    body = b"{}"

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def endpoint():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def completion(text):
    choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
    return {"id": "x", "object": "text_completion", "created": 0, "model": "m", "choices": [choice]}


@pytest.mark.parametrize(
    "body, message",
    [
        (b"<html>not json</html>", "the guide's server gave no completion one can read"),
        (json.dumps({"id": "x", "object": "text_completion"}).encode(), "the guide's server gave no completion"),
        (json.dumps(completion(None)).encode(), "the guide's server answered a completion without text (None)"),
    ],
)
def test_a_served_guides_malformed_answer_is_one_line_before_the_run(tiny, tmp_path, endpoint, body, message):
    """Non-JSON, no choices, a null text: one line naming the endpoint and what was wrong, from the one request sent
    before the run starts, so no run directory is left."""
    Answers.body = body
    base = f"http://127.0.0.1:{endpoint.server_address[1]}/v1"
    argv = command_line(tiny, tmp_path / "runs") + ["--guide-name=openai:m", f"--guide-api-base={base}"]
    done = subprocess.run([sys.executable, "ppo_pp.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)
    one_line(done, f"--guide-api-base {base}: {message}")
    assert not os.path.isdir(tmp_path / "runs") or not os.listdir(tmp_path / "runs")


def test_a_malformed_guide_url_is_one_line(tiny, tmp_path):
    argv = command_line(tiny, tmp_path / "runs") + ["--guide-name=openai:m", "--guide-api-base=127.0.0.1:8000"]
    done = subprocess.run([sys.executable, "ppo_pp.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)
    one_line(done, "--guide-api-base 127.0.0.1:8000: not an http(s) URL of a server")
    assert not os.path.isdir(tmp_path / "runs") or not os.listdir(tmp_path / "runs")


def test_a_served_guides_empty_answer_is_a_guide_that_stopped(tiny, tmp_path, endpoint):
    """An empty completion is the guide choosing to stop at once: the run goes on, no EOS or padding enters a restart
    prefix, and the rollins restarted at their start are counted (rlgf/short_rollin_share)."""
    Answers.body = json.dumps(completion("")).encode()
    base = f"http://127.0.0.1:{endpoint.server_address[1]}/v1"
    _, metrics = run("ppo_pp", tiny, tmp_path, num_iterations=1, beta=1.0, guide_name="openai:m", guide_api_base=base)
    assert metrics[1]["rlgf/short_rollin_share"] == 1.0 and metrics[1]["rlgf/restart_mean"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# A reward that would start random; files that hold code
# ---------------------------------------------------------------------------------------------------------------
def test_a_causal_lm_is_not_taken_for_a_sentiment_classifier(tiny):
    """--reward-model-name pointing at a causal LM: its classification head would start random; refused."""
    from tasks import sentiment

    with pytest.raises(UserError, match="not a trained classifier"):
        sentiment.ClassifierSentiment(tiny["lm"], torch.device("cpu"))
    assert sentiment.ClassifierSentiment(tiny["classifier"], torch.device("cpu"))(["a"], [" great"]).shape == (1,)


class Payload:
    """A pickle that runs code when unpickled: it would create the file `marker`."""

    marker = None

    def __reduce__(self):
        return (open, (Payload.marker, "w"))


def plant(path, marker):
    Payload.marker = str(marker)
    with open(path, "wb") as f:
        pickle.dump({"state": Payload()}, f)


def test_no_file_is_unpickled_with_code_whatever_the_torch_default(tiny, tmp_path, monkeypatch):
    """A pickle with code planted where each file is loaded from (the bag-of-words reward's cache, a checkpoint's
    training_state.pt, a model directory's pytorch_model.bin) runs nothing, even with torch told to unpickle
    anything by default (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, as torch before 2.6 did)."""
    from plumbing import models
    from tasks import sentiment

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "ran"
    monkeypatch.setattr(models, "CACHE_DIR", str(tmp_path / "cache"))
    labelled = {
        "train": [("good fun", True), ("dull mess", False)] * 20,
        "validation": [("fun", True), ("dull", False)],
    }
    sentiment.BagOfWordsSentiment(labelled)  # builds the cache
    (cache,) = [os.path.join(tmp_path / "cache", f) for f in os.listdir(tmp_path / "cache")]
    plant(cache, marker)
    bow = sentiment.BagOfWordsSentiment(labelled)  # the planted cache is not unpickled: rebuilt
    assert not marker.exists() and bow.score(["good fun"]) > bow.score(["dull mess"])
    run_dir = tmp_path / "run" / "checkpoint"
    run_dir.mkdir(parents=True)
    plant(run_dir / "training_state.pt", marker)
    with pytest.raises(UserError, match="not unpickled"):
        runs.load_training_state(str(tmp_path / "run"), None, None, None, None)
    model_dir = shutil.copytree(tiny["lm"], tmp_path / "model")
    os.remove(os.path.join(model_dir, "model.safetensors"))
    plant(os.path.join(model_dir, "pytorch_model.bin"), marker)
    with pytest.raises(Exception):
        models.load_lm(str(model_dir), "cpu")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# Malformed files and bad values: one line
# ---------------------------------------------------------------------------------------------------------------
def write(directory, split, text):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{split}.jsonl"), "wb" if isinstance(text, bytes) else "w") as f:
        f.write(text)


PAIR = json.dumps({"prompt": "POST: a", "chosen": "TL;DR: good", "rejected": "TL;DR: bad"}) + "\n"
POST = json.dumps({"prompt": "POST: great film\nTL;DR:", "label": "great"}) + "\n"


@pytest.mark.parametrize(
    "train, message",
    [
        (json.dumps({"prompt": "POST: a", "chosen": "TL;DR: good"}) + "\n", "because column names don't match"),
        (b"\xff\xfe\x00garbage", "cannot be read"),
        ("", "cannot be read"),
        (
            PAIR + json.dumps({"prompt": "POST: a", "chosen": None, "rejected": "x"}) + "\n",
            "a train pair has a null value",
        ),
        ('{"prompt": "POST: a", "chosen": ', "cannot be read"),
    ],
)
def test_malformed_preference_files_are_one_line(tiny, tmp_path, train, message):
    """reward_model.py's pair files: a missing column, non-UTF-8 bytes, 0 bytes, a null value, broken JSON."""
    write(tmp_path / "pairs", "train", train)
    write(tmp_path / "pairs", "test", PAIR)
    done = subprocess.run(
        [sys.executable, "reward_model.py", "--task", "tldr", "--dataset-name", str(tmp_path / "pairs"), "--model-name",
         tiny["lm"], "--output-dir", str(tmp_path / "runs")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    one_line(done, message)
    assert not os.path.isdir(tmp_path / "runs") or not os.listdir(tmp_path / "runs")


@pytest.mark.parametrize(
    "train, message",
    [
        (json.dumps({"prompt": "POST: a\nTL;DR:"}) + "\n", "because column names don't match"),
        (POST + json.dumps({"prompt": "POST: a\nTL;DR:", "label": None}) + "\n", "a train row has no prompt or label"),
        (b"\xff\xfe\x00garbage", "cannot be read"),
        (json.dumps({"prompt": "POST: a\nTL;DR:", "label": "  "}) + "\n", "no train or validation row with a summary"),
    ],
)
def test_malformed_tldr_files_are_one_line(tiny, tmp_path, reward_dir, train, message):
    """--task tldr files: no label column, a null label, non-UTF-8 bytes, only blank summaries: one line, and no run
    directory left (the data loads after the directory is claimed; it is removed again)."""
    write(tmp_path / "tldr", "train", train)
    write(tmp_path / "tldr", "valid", POST)
    args = tiny_args(__import__("ppo"), tiny, tmp_path / "runs", task="tldr", dataset_name=str(tmp_path / "tldr"))
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if v is not None and not isinstance(v, bool)
            and k not in ("reward_model_name", "lora_r", "critic")]  # fmt: skip
    done = ppo(*argv, f"--reward-model-name={reward_dir}", "--lora-r=0", "--critic=shared")
    one_line(done, message)
    assert not os.path.isdir(tmp_path / "runs") or not os.listdir(tmp_path / "runs")


@pytest.fixture(scope="module")
def reward_dir(tiny, tmp_path_factory):
    from test_tldr import train_reward_model

    return train_reward_model(tiny, tmp_path_factory.mktemp("rm"), num_epochs=1.0)[0]


@pytest.mark.parametrize("damage", ["reward_head.safetensors", "reward_model.json"])
def test_a_damaged_reward_model_checkpoint_is_one_line(tmp_path, reward_dir, damage):
    from tasks import learned_reward

    path = shutil.copytree(reward_dir, tmp_path / "rm")
    with open(os.path.join(path, damage), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(path, damage)) // 2)
    with pytest.raises(UserError, match=f"--reward-model-name {path}: a damaged reward_model.py checkpoint"):
        learned_reward.LearnedReward(str(path), torch.device("cpu"))


@pytest.mark.parametrize(
    "content, message", [("[1, 2]", "not a run directory"), (None, "args.json's learning_rate is 'fast'")]
)
def test_an_args_json_that_is_not_a_record_is_one_line(tmp_path, tiny, content, message):
    out = tmp_path / "runs"
    done = ppo(*command_line(tiny, out), "--num-iterations=1", "--save-every=1")
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = [os.path.join(out, d) for d in os.listdir(out)]
    record = json.load(open(os.path.join(run_dir, "args.json")))
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        f.write(content if content is not None else json.dumps({**record, "learning_rate": "fast"}))
    one_line(ppo("--resume", run_dir), message)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last_one(tiny, tmp_path, monkeypatch):
    """The disk fills while iteration 2's checkpoint is written: one line saying so, the iteration-1 checkpoint whole
    and in place, nothing half-written left beside it."""
    from plumbing import runs as runs_module

    save, calls = runs_module.save_checkpoint_model, []

    def full(*args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(*args)

    monkeypatch.setattr(runs_module, "save_checkpoint_model", full)
    with pytest.raises(UserError, match=r"^iteration 2: the checkpoint cannot be written .* No space left on device"):
        run("ppo", tiny, tmp_path, num_iterations=3, save_every=1, eval_size=4)
    (run_dir,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
    assert sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint")) == ["checkpoint"]
    assert runs_module.complete(os.path.join(run_dir, "checkpoint"))
    assert torch.load(os.path.join(run_dir, "checkpoint", "training_state.pt"), weights_only=True)["iteration"] == 1


# ---------------------------------------------------------------------------------------------------------------
# A study owns its children
# ---------------------------------------------------------------------------------------------------------------
def study(*argv, wait=True):
    command = [sys.executable, "benchmark/study.py", *argv]
    if wait:
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--parallel", "0"], "--parallel and --num-iterations must be >= 1"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--algorithms", "ppo", "nope"], "unknown algorithm(s) nope"),
        (["--no-such-flag"], "unknown flag --no-such-flag"),
    ],
)
def test_a_studys_bad_values_are_one_line_before_anything_runs(tmp_path, argv, message):
    done = study(*argv, "--output", str(tmp_path / "study"))
    one_line(done, message)
    assert not os.path.isdir(tmp_path / "study" / "runs")


def test_a_failing_child_run_is_one_line(tiny, tmp_path):
    """A run that fails inside the study (here: a flag after -- that the scripts refuse): one line naming the script,
    its last line and its log."""
    done = study(
        "--output", str(tmp_path / "study"), "--seeds", "1", "--algorithms", "ppo", "--", "--learning-rate", "-1"
    )
    one_line(done, "sft.py stopped (exit 2): error: unknown flag --learning-rate")


def children(marker):
    """The pids of the processes whose command line holds `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker in open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace"):
                found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the child's end is Linux's parent-death signal")
def test_a_killed_study_takes_its_children_with_it(tiny, tmp_path):
    """kill -9 of study.py while a child runs: the child ends too (it would otherwise go on writing a run that the
    study, run again, starts over)."""
    out = tmp_path / "study"
    flags = ["--dataset-name", tiny["imdb"], "--model-name", tiny["lm"], "--eval-lm-name", tiny["lm"]]
    process = study("--task", "imdb", "--output", str(out), "--seeds", "1", "--algorithms", "ppo", "--", *flags,
                    "--reward-model-name", tiny["classifier"], "--num-epochs", "50", wait=False)  # fmt: skip
    deadline = time.time() + 300
    while not [p for p in children(str(out)) if p != process.pid]:
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.2)
    (child,) = [p for p in children(str(out)) if p != process.pid]
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.time() + 30
    while child in children(str(out)):
        assert time.time() < deadline, "the study's child outlived it"
        time.sleep(0.2)
