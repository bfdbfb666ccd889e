"""The declared dependencies (pyproject.toml), requirements.txt and the locks agree: requirements.txt is exactly the
declared runtime set, and the locks pin every declared package, within its range, and none of what the --no-deps
packages declare."""

import os
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _lines(name):
    """A requirements file's requirements, comments and blank lines left out."""
    with open(os.path.join(ROOT, name)) as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


def _key(text):
    r = Requirement(text)
    return canonicalize_name(r.name), r.extras, r.specifier, r.marker and str(r.marker)


def _lock(name):
    pins = {}
    for line in _lines(name):
        r = Requirement(line)
        (spec,) = r.specifier
        assert spec.operator == "==" and not r.marker and not r.extras, f"{name}: not an exact pin: {line}"
        assert canonicalize_name(r.name) not in pins, f"{name}: {r.name} twice"
        pins[canonicalize_name(r.name)] = spec.version
    return pins


def test_requirements_txt_is_the_declared_runtime_set():
    declared = [_key(r) for r in _pyproject()["project"]["dependencies"]]
    assert [_key(r) for r in _lines("requirements.txt")] == declared


def test_locks_pin_every_declared_package_within_its_range():
    project = _pyproject()
    groups = project["dependency-groups"]
    runtime, test = _lock("requirements.lock"), _lock("requirements-test.lock")
    assert not set(runtime) & set(test), "a package pinned in both locks"
    for lock, declared in [
        (runtime, project["project"]["dependencies"] + groups["offline"]),
        (test, groups["test"] + groups["test-no-deps"]),
    ]:
        for text in declared:
            r = Requirement(text)
            name = canonicalize_name(r.name)
            pinned = lock.get(name, runtime.get(name))
            assert pinned is not None, f"{r.name} is declared but in no lock: run make lock"
            assert r.specifier.contains(pinned, prereleases=True), f"{r.name}=={pinned} is outside {r.specifier}"


def test_what_the_no_deps_packages_declare_is_never_installed():
    pinned = set(_lock("requirements.lock")) | set(_lock("requirements-test.lock"))
    for heavy in ["llm", "llama-cpp-python", "spacy", "gensim", "pycocotools"]:
        assert heavy not in pinned
