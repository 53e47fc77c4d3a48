"""Every path, module attribute and command the README and the docs name exists: a renamed file, function or
option fails here instead of misleading a reader."""

import importlib
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from workbench import __main__ as cli
from workbench.modeling import runs
from workbench.training import train
from workbench.measurement.evaluate import EvalConfig

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md",
        REPO / "notebooks" / "README.md"]
# every module by its own name, as the docs write it (``runs.run_info``), with its dotted path in the package
MODULES = {p.stem: ".".join(p.relative_to(REPO).with_suffix("").parts) for p in (REPO / "workbench").rglob("*.py")
           if p.stem not in ("__init__", "__main__")}
TOP = {p.name for p in REPO.iterdir()} - {".git", ".venv"}
SOURCE_FILE = re.compile(r"^[\w.-]+\.(py|ipynb|sh|yaml)$")
# the names of the files git tracks (a bare file name in the docs must be one of them, not a run's output)
TRACKED = {Path(f).name for f in subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                                                 check=True).stdout.split()}


def _spans(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


def _code_lines(text: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.split("  #")[0].strip() for b in blocks for line in b.splitlines() if line.strip()]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_path_and_link_named_exists(doc):
    text = doc.read_text()
    missing = []
    for span in _spans(text):
        token = span.split()[0].rstrip(",:;")
        if "<" in token or "..." in token or "*" in token or token.startswith("runs/"):  # runs/: outputs
            continue
        first = token.split("/")[0]
        if "/" in token and first in TOP:  # a path in the repository
            if not (REPO / token.split("#")[0]).exists():
                missing.append(token)
        elif SOURCE_FILE.match(token) and token not in TRACKED and token not in runs.__doc__:  # not a run-folder file
            missing.append(token)
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http") and not (doc.parent / target).exists():
            missing.append(target)
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


def _anchors(path: Path) -> set[str]:
    """The #anchors of a markdown file's headings, as GitHub makes them (lower case, punctuation dropped, spaces to
    hyphens, a repeated heading numbered)."""
    seen: dict[str, int] = {}
    out = set()
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # a '#' in a code block is no heading
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_anchor_linked_exists(doc):
    """A link to a section (``[...](file.md#section)`` or ``[...](#section)``) lands on a heading of that file."""
    broken = []
    for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", doc.read_text()):
        if target.startswith("http"):
            continue
        path = doc if not target else (doc.parent / target)
        if path.suffix == ".md" and path.exists() and anchor not in _anchors(path):
            broken.append(f"{target}#{anchor}")
    assert not broken, f"{doc.name} links to sections that do not exist: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_module_attribute_named_exists(doc):
    missing = []
    for span in _spans(doc.read_text()):
        m = re.match(r"^(?:workbench\.(?:[a-z]+\.)?)?([a-z_]+)\.([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_]\w*))?", span)
        if not m or m.group(1) not in MODULES or m.group(2) in ("json", "jsonl", "csv", "py", "md"):  # file names
            continue
        obj = importlib.import_module(MODULES[m.group(1)])
        for part in (m.group(2), m.group(3)):
            if part is None:
                break
            if not hasattr(obj, part):
                missing.append(span)
                break
            obj = getattr(obj, part)
    assert not missing, f"{doc.name} names what the package does not have: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_shown_exists_with_its_options(doc):
    _, sub = cli.build_parser()
    problems = []
    for line in _code_lines(doc.read_text()):
        words = shlex.split(line.replace("<", "X").replace(">", "X").replace("|", " "))
        if words[:2] == ["bash", "scripts/main.sh"] or words[:2] == ["bash", "scripts/test.sh"] or words[:2] == ["bash", "scripts/lab.sh"]:
            if not (REPO / words[1]).exists():
                problems.append(line)
        elif words[:1] == ["python"] and len(words) > 1 and words[1].startswith("benchmarks/"):
            script = REPO / words[1]
            opts = [w.split("=")[0] for w in words[2:] if w.startswith("--")]
            if not script.exists() or any(f'"{o}"' not in script.read_text() for o in opts):
                problems.append(line)
        elif words[:3] == ["python", "-m", "workbench"]:
            command, rest = words[3], words[4:]
            if command not in sub:
                problems.append(f"{line}: no command '{command}'")
                continue
            known = {o for a in sub[command]._actions for o in a.option_strings}
            if command == "train":
                known |= {f"--{f.replace('_', '-')}" for f in train.config_fields(rest[0])}
            if command == "evaluate":
                known |= {f"--{f.replace('_', '-')}" for f in EvalConfig.__dataclass_fields__}
            unknown = [w.split("=")[0] for w in rest if w.startswith("--") and w.split("=")[0] not in known]
            if unknown:
                problems.append(f"{line}: {unknown}")
    assert not problems, f"{doc.name} shows commands that would fail: {problems}"


def test_the_readme_is_a_front_door():
    assert len((REPO / "README.md").read_text().splitlines()) <= 150


def test_the_config_page_is_generated_from_the_configs():
    """docs/config.md is what ``python -m workbench config-docs`` writes from the config classes: a field added,
    re-defaulted or re-explained in the code and not in the page fails here (regenerate the page)."""
    assert (REPO / "docs" / "config.md").read_text() == cli.config_page() + "\n", (
        "docs/config.md is out of date: python -m workbench config-docs > docs/config.md")
