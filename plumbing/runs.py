"""A run's bookkeeping, shared by every script and touching no algorithm: the command line, the run directory and its
record (args.json), the logs, a guard against non-finite values, and checkpoints that a crash cannot spoil.

What a crash (kill -9 included) loses: the iterations since the last checkpoint (`--save-every`), nothing else. A
checkpoint is written into checkpoint.tmp and swapped in by renames; training_state.pt is written last (by a rename),
so a checkpoint directory with a readable training_state.pt and model.safetensors is complete. `--resume DIR` takes
the newest complete one, cuts the logs back to its iteration and continues exactly (the random streams are saved)."""

import dataclasses
import difflib
import fcntl
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
import typing
import zipfile

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from plumbing import UserError, check, check_probability
from plumbing.models import save_checkpoint_model
from plumbing.parallel import broadcast, gather_lists, is_main, processes, total, wait_for_everyone

# What --resume may change: nothing the run has learned so far depends on these. (With --lr-schedule linear, a new
# --num-iterations stretches the rest of the schedule.)
RESUMABLE = (
    "resume",
    "num_iterations",
    "eval_every",
    "save_every",
    "device",
    "output_dir",
    "tensorboard",
    "track",
    "guide_api_base",
)


# ---------------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------------
def cli(main, args_class, defaults=None):
    """Parse the command line (parse) and run main(args); bad input ends with a one-line error and exit status 2."""
    if not is_main():  # under accelerate launch, only the main process prints (errors still reach stderr)
        sys.stdout = open(os.devnull, "w")
    try:
        main(parse(args_class, sys.argv[1:], defaults))
    except UserError as e:
        forget_claimed()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BaseException:
        forget_claimed()
        raise


def parse(args_class, argv, defaults=None):
    """The flags with tyro. defaults(args_class, task) gives their defaults for --task (tasks.defaults: the task's
    preset over the script's own), so that --help with --task X shows X's values. With --resume DIR, a flag not typed
    takes the run's recorded value (DIR/args.json), so `--resume DIR` is enough."""
    import tyro

    check_flags(args_class, argv)
    check_choices(args_class, argv)
    resume = typed_value(argv, "--resume")
    if defaults is None:
        default = args_class()
    else:
        task = typed_value(argv, "--task") or (record(resume).get("task") if resume else None) or args_class().task
        default = defaults(args_class, task)
    args = tyro.cli(args_class, default=default, args=argv)
    if getattr(args, "resume", None):
        check_script(args)
        typed = {a[2:].partition("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
        typed |= {name[3:] for name in typed if name.startswith("no_")}  # --no-tensorboard
        for name, value in record(args.resume).items():
            if name not in typed and hasattr(args, name):
                kind = type(getattr(args, name))
                fits = (
                    value is None
                    or getattr(args, name) is None
                    or isinstance(value, kind)
                    or kind is float
                    and type(value) is int
                )
                check(fits, f"--resume {args.resume}: args.json's {name} is {value!r}, not a {kind.__name__}")
                setattr(args, name, value)
    check_args(args)
    return args


def typed_value(argv, flag):
    """The value typed for --flag (tyro takes --eval-split X, --eval_split X, --eval-split=X), or None."""
    for arg, after in zip(argv, argv[1:] + [None]):
        name, equals, inline = arg.partition("=")
        if name.replace("_", "-") == flag:
            return inline if equals else after
    return None


def check_flags(args_class, argv):
    """A flag the script does not have: one line naming it (and the closest ones), not tyro's box."""
    fields = dataclasses.fields(args_class)
    known = {"help"} | {f.name.replace("_", "-") for f in fields}
    known |= {"no-" + f.name.replace("_", "-") for f in fields if f.type is bool}
    for arg in argv:
        flag = arg[2:].partition("=")[0].replace("_", "-") if arg.startswith("--") else None
        if flag and flag not in known:
            close = difflib.get_close_matches(flag, sorted(known), n=3)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else "; see --help"
            raise UserError(f"unknown flag --{flag}{hint}")


def check_choices(args_class, argv):
    """A flag typed with its choices (Literal: --task, --eval-split) given another value: one line, not tyro's box."""
    for field in dataclasses.fields(args_class):
        if typing.get_origin(field.type) is typing.Literal:
            choices = typing.get_args(field.type)
            value = typed_value(argv, "--" + field.name.replace("_", "-"))
            check(
                value is None or value in choices,
                f"unknown {field.name.replace('_', ' ')} '{value}'; choose one of: {', '.join(choices)}",
            )


def check_args(args):
    """One-line errors for bad values of the flags this script has."""
    has = lambda name: getattr(args, name, None) is not None  # noqa: E731
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        check(
            not isinstance(value, float) or math.isfinite(value),
            f"--{field.name.replace('_', '-')} must be a finite number, got {value}",
        )
    for name in ("num_iterations", "eval_every", "save_every", "top_k", "kl_coef", "vf_coef", "mle_coef", "eval_size"):
        if has(name):
            check(getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in (
        "rollouts_per_iteration",
        "minibatch_size",
        "ppo_epochs",
        "max_new_tokens",
        "prompt_len",
        "eval_num_beams",
        "eval_best_of",
    ):
        if has(name):
            check(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if has("max_new_tokens"):
        check(0 <= args.min_new_tokens <= args.max_new_tokens, "--min-new-tokens must be in [0, --max-new-tokens]")
    if has("rollouts_per_iteration") and has("minibatch_size"):
        check(
            args.rollouts_per_iteration % args.minibatch_size == 0,
            "--rollouts-per-iteration must be a multiple of --minibatch-size",
        )
    if has("gradient_accumulation_steps"):
        check(
            args.gradient_accumulation_steps >= 1 and args.minibatch_size % args.gradient_accumulation_steps == 0,
            "--gradient-accumulation-steps must be >= 1 and divide --minibatch-size",
        )
        n = processes()[1]  # accelerate launch --num_processes n: each process takes 1/n of every minibatch
        check(
            args.minibatch_size % (n * args.gradient_accumulation_steps) == 0,
            f"--minibatch-size must be a multiple of the {n} processes x --gradient-accumulation-steps "
            f"{args.gradient_accumulation_steps}",
        )
    for name in ("top_p", "guide_top_p", "gamma", "gae_lambda", "beta", "beta_ppo_pp", "beta_aggrevated"):
        if has(name):
            check_probability(getattr(args, name), f"--{name.replace('_', '-')}")
    for name in (
        "learning_rate",
        "vf_learning_rate",
        "sft_learning_rate",
        "max_grad_norm",
        "clip_range",
        "vf_clip_range",
    ):
        if has(name):
            check(getattr(args, name) > 0, f"--{name.replace('_', '-')} must be > 0")
    if has("lora_r"):
        check(
            args.lora_r >= 0 and args.lora_alpha > 0 and 0 <= getattr(args, "lora_dropout", 0.0) < 1,
            "--lora-r must be >= 0, --lora-alpha > 0, --lora-dropout in [0, 1)",
        )
    check(
        getattr(args, "eval_best_of", 1) == 1 or args.eval_num_beams == 1,
        "--eval-best-of needs sampled evaluations (--eval-num-beams 1)",
    )
    check(
        getattr(args, "eval_judge", None) is None or args.task == "tldr",
        "--eval-judge: the judged win rate is a tldr metric (--task tldr)",
    )


# ---------------------------------------------------------------------------------------------------------------
# The run directory and its record
# ---------------------------------------------------------------------------------------------------------------
def script_of(args):
    """The script whose Args these are (ppo.py, ...), run as a program or imported."""
    return os.path.basename(sys.modules[type(args).__module__].__file__)


def record(path):
    """The flags a run was started with ({} when there is no readable args.json)."""
    try:
        with open(os.path.join(path, "args.json")) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def check_script(args):
    made_by = record(args.resume).get("script", script_of(args))
    check(
        made_by == script_of(args),
        f"--resume {args.resume}: that run was made by {made_by}; "
        f"continue it with python {made_by} --resume {args.resume}",
    )


def run_dir(args):
    """`--resume DIR` continues in DIR, after checking that the run is this script's, that no flag outside RESUMABLE
    differs from its record, and that a complete checkpoint is there. Otherwise a new
    `{output_dir}/{task}__{exp_name}__{seed}__{time}`, created here and owned by this run alone (a second run started
    in the same second gets `..._2`). Either way this process holds the directory's lock until it ends; a new one
    that the run leaves empty (it stopped before its first record) is removed by cli."""
    if args.resume:
        recorded = record(args.resume)
        check(recorded, f"--resume {args.resume}: not a run directory (no readable args.json there)")
        check_script(args)
        now = json.loads(json.dumps(dataclasses.asdict(args)))
        changed = [
            f"--{k.replace('_', '-')} {v} (the run's: {recorded.get(k)})"
            for k, v in now.items()
            if k not in RESUMABLE and v != recorded.get(k)
        ]
        check(
            not changed,
            f"--resume {args.resume}: flags that differ from the run's record (args.json): {', '.join(changed)}; only "
            f"{', '.join('--' + k.replace('_', '-') for k in RESUMABLE[1:])} may change",
        )
        lock(args.resume)
        recover_checkpoint(args.resume)
        return args.resume
    check(
        os.sep not in args.exp_name and args.exp_name not in ("", ".", ".."), "--exp-name must be a plain name (no /)"
    )
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=args.output_dir).close()
    except OSError as e:
        raise UserError(f"--output-dir {args.output_dir}: cannot write there ({e.strerror})") from None
    path = None
    if is_main():
        base = path = os.path.join(args.output_dir, f"{args.task}__{args.exp_name}__{args.seed}__{int(time.time())}")
        for n in itertools.count(2):
            try:
                os.mkdir(path)
                break
            except FileExistsError:
                path = f"{base}_{n}"
        CLAIMED.append(path)
        lock(path)
    return broadcast(path)  # the main process's


CLAIMED = []  # the new run directories of this process: cli removes one the run left without a record
LOCKS = {}  # the lock files this process holds open (the operating system releases them when it ends, kill -9 too)


def lock(path):
    """Hold path/run.lock for as long as this process lives: a second process that would write the same run
    directory (two --resume of one run, a study run again beside its run still going) stops in one line."""
    if not is_main() or os.path.realpath(path) in LOCKS:
        return
    f = open(os.path.join(path, "run.lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        owner = f.read().strip() or "?"
        f.close()
        raise UserError(f"{path}: another process (pid {owner}) is running this run; wait for it, or stop it") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    LOCKS[os.path.realpath(path)] = f


def forget_claimed():
    """Remove the new run directories this process made and left without a record (it stopped before its first)."""
    for path in CLAIMED:
        if os.path.isdir(path) and set(os.listdir(path)) <= {"run.lock"}:
            shutil.rmtree(path, ignore_errors=True)
    CLAIMED.clear()


# ---------------------------------------------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------------------------------------------
class Logger:
    """metrics.jsonl (one JSON object per line, an iteration each), samples.jsonl, optional TensorBoard and Weights &
    Biases. A new run records its flags in args.json; a resumed one (start > 0) keeps that record and drops the rows
    logged after its checkpoint's iteration, which the resumed run logs again. Under accelerate launch only the main
    process writes (the rows hold figures of all processes)."""

    def __init__(self, path, args, start=0, tensorboard=False, track=False, project="rlgf"):
        self.path = path if is_main() else None
        self.writer = self.wandb = None
        if self.path is None:
            return
        os.makedirs(path, exist_ok=True)
        if start == 0:
            with open(os.path.join(path, "args.json"), "w") as f:
                json.dump({"script": script_of(args), **dataclasses.asdict(args)}, f, indent=1)
        for name in ("metrics.jsonl", "samples.jsonl"):
            cut_log(os.path.join(path, name), start)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(
                path, purge_step=start + 1 if start else None
            )  # drops events after the checkpoint
        if track:
            try:
                import wandb
            except ImportError:
                raise UserError("--track needs the wandb package: pip install wandb") from None
            self.wandb = wandb
            wandb.init(
                project=project,
                name=os.path.basename(path),
                id=os.path.basename(path),
                resume="allow",
                config=dataclasses.asdict(args),
                dir=path,
            )

    def log(self, row, samples=None):
        reward = row.get("eval/reward", 0.0)
        check(
            math.isfinite(reward),
            f"iteration {row['iteration']}: the evaluation's reward is {reward}; stopped: nothing of this iteration "
            "was saved or logged, the last checkpoint is untouched",
        )
        if self.path is None:
            return
        row = {
            k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()
        }  # stays valid JSON
        with open(os.path.join(self.path, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        if samples:
            with open(os.path.join(self.path, "samples.jsonl"), "a") as f:
                for s in samples:
                    f.write(json.dumps({"iteration": row["iteration"], **s}) + "\n")
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "iteration"}
        if self.writer:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, row["iteration"])
            self.writer.flush()
        if self.wandb:
            self.wandb.log(scalars, step=row["iteration"])

    def close(self):
        if self.writer:
            self.writer.close()
        if self.wandb:
            self.wandb.finish()


def cut_log(file, start):
    """Keep the rows of iterations <= start (all of them when start is 0) and drop a last line a crash cut short."""
    if not os.path.isfile(file):
        return
    kept = []
    with open(file) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not start or row["iteration"] <= start:
                kept.append(json.dumps(row) + "\n")
    with open(file + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(file + ".tmp", file)


def check_finite(iteration, **values):
    """Stop at the first non-finite reward, loss or gradient norm, before it reaches the weights, the logs or a
    checkpoint: the last checkpoint stays as it was, and --resume continues from it. Every process counts the values
    of all, so that all stop together."""
    for name, value in values.items():
        bad = ~torch.isfinite(torch.as_tensor(value).detach())
        bad, count = total(torch.stack([bad.sum(), torch.tensor(bad.numel(), device=bad.device)])).tolist()
        check(
            not bad,
            f"iteration {iteration}: non-finite {name.replace('_', ' ')} ({bad} of {count} "
            "values); stopped before the update: nothing of this iteration was saved or logged, "
            "the last checkpoint is untouched",
        )


def check_weights(iteration, *modules):
    """Stop before logging or saving an iteration whose update left a weight non-finite (a --learning-rate too
    large for float, a step that overflowed): the last checkpoint stays as it was, and --resume continues from it."""
    params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
    if not params:
        return
    with torch.no_grad():  # the sum is finite unless a weight is not (or it overflows): only then count them
        if total(torch.stack([p.sum(dtype=torch.float32) for p in params]).sum()).isfinite().item():
            return
        bad = total(torch.stack([(~torch.isfinite(p)).sum() for p in params]).sum()).item()
    check(
        not bad,
        f"iteration {iteration}: {bad} weights are non-finite after the update; stopped: nothing of this iteration "
        "was saved or logged, the last checkpoint is untouched",
    )


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------
def save_checkpoint(path, policy, tokenizer, value_head, optimizer, scheduler, iteration, rng):
    """The policy as a from_pretrained directory, plus what --resume needs to continue exactly. Written into
    checkpoint.tmp, then swapped in: checkpoint -> checkpoint.old, checkpoint.tmp -> checkpoint, checkpoint.old
    removed. A crash at any point leaves a complete checkpoint that recover_checkpoint finds; leftovers of an
    earlier crash never make a save fail. Under accelerate launch the main process writes it, with the random streams
    of every process."""
    streams = gather_lists(
        [
            dict(
                torch_rng=torch.get_rng_state(),
                restart_rng=rng.get_state(),
                cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            )
        ]
    )
    if not is_main():
        return
    final = os.path.join(path, "checkpoint")
    tmp, old = final + ".tmp", final + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    state = dict(
        value_head=value_head.state_dict() if value_head is not None else None,
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        iteration=iteration,
        streams=streams,
    )
    try:
        save_checkpoint_model(policy, tokenizer, tmp)
        torch.save(state, os.path.join(tmp, "training_state.pt.part"))
        os.replace(os.path.join(tmp, "training_state.pt.part"), os.path.join(tmp, "training_state.pt"))  # now complete
    except (OSError, RuntimeError, SafetensorError) as e:  # a full disk, a lost mount: torch and safetensors say it so
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"iteration {iteration}: the checkpoint cannot be written in {path} ({str(e).strip().splitlines()[0]}); "
            f"the last complete one is kept: make room, then --resume {path}"
        ) from None
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def complete(directory):
    """Both files of a checkpoint there and readable (a zip archive and a safetensors header that cover the files); the
    weights are model.safetensors, or adapter_model.safetensors under LoRA."""
    try:
        zipfile.ZipFile(os.path.join(directory, "training_state.pt")).close()
        lora = os.path.isfile(os.path.join(directory, "adapter_model.safetensors"))
        with safe_open(os.path.join(directory, "adapter_model.safetensors" if lora else "model.safetensors"), "pt"):
            return True
    except Exception:  # missing, empty, cut short, not a checkpoint
        return False


def recover_checkpoint(path):
    """Make `checkpoint` the newest complete one of checkpoint.tmp (a save that was written but not swapped in),
    checkpoint and checkpoint.old (moved aside by a swap that was cut short), and remove the others. Every step
    leaves the chosen one in place, so a crash here too loses nothing."""
    final = os.path.join(path, "checkpoint")
    newest = next((d for d in (final + ".tmp", final, final + ".old") if complete(d)), None)
    check(
        newest is not None,
        f"--resume {path}: no complete checkpoint there (checkpoint/training_state.pt or "
        "model.safetensors missing or damaged); start the run again",
    )
    wait_for_everyone()  # under accelerate launch: every process has looked; the main one moves, the others wait
    if is_main():
        _keep_only(final, newest)
    wait_for_everyone()


def _keep_only(final, newest):
    if newest != final:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(newest, final)
    for leftover in (final + ".tmp", final + ".old"):
        shutil.rmtree(leftover, ignore_errors=True)


def load_training_state(path, value_head, optimizer, scheduler, rng):
    """save_checkpoint stores tensors, numbers, dicts and lists only: torch.load unpickles no code (weights_only)."""
    try:
        state = torch.load(os.path.join(path, "checkpoint", "training_state.pt"), weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for pickled code
        raise UserError(
            f"--resume {path}: training_state.pt holds more than tensors and plain values, or is damaged; it is not "
            f"unpickled ({type(e).__name__})"
        ) from None
    if value_head is not None:  # (GRPO has none)
        value_head.load_state_dict(state["value_head"])
    rank, count = processes()
    check(
        len(state["streams"]) == count,
        f"--resume {path}: the run was made by {len(state['streams'])} process(es) and continues "
        f"exactly only with as many (accelerate launch --num_processes {len(state['streams'])}, or python for 1)",
    )
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    streams = state["streams"][rank]  # this process's random streams
    torch.set_rng_state(streams["torch_rng"])
    rng.set_state(streams["restart_rng"])
    if streams["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(streams["cuda_rng"])
    print(f"resuming {path} after iteration {state['iteration']}")
    return state["iteration"]


def progress(count, initial, desc):
    """The run's progress bar (the main process's only)."""
    return tqdm(total=count, initial=initial, desc=desc, dynamic_ncols=True, disable=not is_main())
