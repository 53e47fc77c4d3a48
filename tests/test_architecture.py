"""The joints of the package: no import cycle, no module reaching into another's private names, one config path
from the command line, the notebooks and the grids, and clear errors (exit code 2) for bad input on the command line."""

import ast
import json
from pathlib import Path

import pytest

from workbench import __main__ as cli
from workbench.modeling import runs
from workbench.orchestration import grid as grids
from workbench.training import train

PACKAGE = Path(__file__).resolve().parents[1] / "workbench"
# the layers, bottom up: a module imports from its own layer and those below it, never from one above
LAYERS = ["core", "modeling", "training", "measurement", "reporting", "orchestration"]
# every module as "<layer>.<module>" ("__main__" at the top)
MODULES = sorted(str(p.relative_to(PACKAGE).with_suffix("")).replace("/", ".") for p in PACKAGE.rglob("*.py")
                 if p.name != "__init__.py")
SHORT = {m.rsplit(".", 1)[-1]: m for m in MODULES}


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0]) if "." in module else len(LAYERS)


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported workbench module as "<layer>.<module>", names taken from it, line) for every import in ``module``,
    at any depth (a function-level import is a dependency too)."""
    tree = ast.parse((PACKAGE / f"{module.replace('.', '/')}.py").read_text())
    here = module.split(".")[:-1]  # the package a relative import starts from
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = here[: len(here) - (node.level - 1)] + (node.module.split(".") if node.module else [])
        elif (node.module or "").split(".")[0] == "workbench":
            base = node.module.split(".")[1:]
        else:
            continue
        dotted = ".".join(base)
        if dotted in MODULES:  # from .x import a, b
            out.append((dotted, [a.name for a in node.names], node.lineno))
        else:  # from . import x, y / from ..layer import x
            out += [(f"{dotted}.{a.name}".lstrip("."), [], node.lineno) for a in node.names
                    if f"{dotted}.{a.name}".lstrip(".") in MODULES]
    return out


def test_the_package_has_no_import_cycle():
    graph = {m: {dep for dep, _, _ in _imports(m) if dep != m} for m in MODULES}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = "done"

    for m in MODULES:
        if m not in state:
            visit(m)
    # training does not depend on evaluation, nor the readers on either
    assert SHORT["evaluate"] not in graph[SHORT["ppo"]] | graph[SHORT["train"]] | graph[SHORT["results"]] | graph[SHORT["widgets"]]
    assert SHORT["sampling"] in graph[SHORT["ppo"]] and SHORT["sampling"] in graph[SHORT["measure"]]
    # the evaluation in parts, one way through: the runner reads the plan and the measurements; the plan samples
    # nothing and the measurements write nothing
    assert {SHORT["plan"], SHORT["measure"]} <= graph[SHORT["evaluate"]]
    assert not {SHORT["sampling"], SHORT["measure"], SHORT["evaluate"]} & graph[SHORT["plan"]]
    assert SHORT["evaluate"] not in graph[SHORT["measure"]] and SHORT["runs"] not in graph[SHORT["measure"]]


def test_every_module_sits_in_a_layer_and_imports_none_above_it():
    """The package's folders are its layers (core, modeling, training, measurement, reporting, orchestration; the
    command line on top): a module imports from its own layer or one below, and each layer's ``__init__`` names
    its modules (its public surface) without importing them."""
    assert {m.split(".")[0] for m in MODULES} == set(LAYERS) | {"__main__"}
    upward = [f"{m} imports {dep}" for m in MODULES for dep, _, _ in _imports(m) if _layer(dep) > _layer(m)]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)
    for layer in LAYERS:
        init = ast.parse((PACKAGE / layer / "__init__.py").read_text())
        declared = next(ast.literal_eval(n.value) for n in init.body
                        if isinstance(n, ast.Assign) and n.targets[0].id == "__all__")
        assert sorted(declared) == sorted(m.split(".")[1] for m in MODULES if m.startswith(f"{layer}.")), layer
        assert not [n for n in init.body if isinstance(n, (ast.Import, ast.ImportFrom))], f"{layer}/__init__ imports"
    # a layer test that could fail: a module of the core importing the modeling layer is caught
    assert _layer("modeling.runs") > _layer("core.methods")


def test_no_module_uses_another_modules_private_names():
    found = []
    for m in MODULES:
        src = (PACKAGE / f"{m.replace('.', '/')}.py").read_text()
        tree = ast.parse(src)
        for dep, names, line in _imports(m):
            found += [f"{m}.py:{line}: from {dep} import {n}" for n in names if n.startswith("_") and dep != m]
        imported = {dep.rsplit(".", 1)[-1] for dep, names, _ in _imports(m) if not names}  # `from . import x`: x.attr
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in imported):
                found.append(f"{m}.py:{node.lineno}: {node.value.id}.{node.attr}")
    assert not found, "private names used across modules:\n" + "\n".join(found)


# ----------------------------------------------------------------------------------------------------------
# One config path


PARAMS = {"beta": 0.2, "max_steps": 3, "learning_rate": 2e-4, "n_train": 8, "max_length": 192, "seed": 1,
          "loss_type": ["sigmoid", "sft"], "run_name": "same", "runs_dir": "somewhere", "load_in_4bit": False}


def _cli_text(v) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v))
    return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def _from_cli(capsys, method, params) -> dict:
    argv = ["train", method, "--print-config"]
    for k, v in params.items():
        argv += [f"--{k.replace('_', '-')}", _cli_text(v)]
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)["config"]


def _from_notebook(notebook, params) -> dict:
    """Run the notebook's cells up to its make_config call with the parameters injected after the parameters
    cell, as papermill does."""
    nb = json.loads((grids.NOTEBOOKS / notebook).read_text())
    ns = {}
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        exec(src, ns)
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            ns.update(params)
        if "make_config(" in src:
            return runs.to_jsonable(ns["cfg"])
    raise AssertionError(f"{notebook} never calls make_config")


def _from_grid(tmp_path, notebook, params) -> dict:
    grid = tmp_path / "g.yaml"
    grid.write_text(json.dumps({"name": "g", "stages": [{"stage": "s", "notebook": notebook, "params": params}]}))
    _, jobs = grids.load_grid(grid)
    return runs.to_jsonable(grids.job_config(jobs[0])[1])


@pytest.mark.parametrize("notebook,method,params", [
    ("04_preference.ipynb", "dpo", PARAMS),
    ("03_rl.ipynb", "ppo", {"beta": 0.2, "max_steps": 3, "n_train": 8, "seed": 1, "runs_dir": "somewhere",
                            "max_new_tokens": 12, "per_device_train_batch_size": 4, "learning_rate": 2e-4}),
])
def test_the_command_line_a_notebook_and_a_grid_build_the_same_config(capsys, tmp_path, notebook, method, params):
    nb_params = grids.notebook_parameters(grids.NOTEBOOKS / notebook)
    params = {k: v for k, v in params.items() if k in nb_params}  # what this notebook exposes
    assert len(params) >= 6, sorted(nb_params)
    # the same parameters everywhere: the notebook's own, with these over them
    from_cli = _from_cli(capsys, method, {k: v for k, v in {**nb_params, **params}.items()
                                          if k not in ("method", "overrides")})  # overrides: the notebook's dict
    from_nb = _from_notebook(notebook, {"method": method, **params})
    from_grid = _from_grid(tmp_path, notebook, {"method": method, **params})
    volatile = ("output_dir", "logging_dir")  # TRL's, set when training starts
    for cfg in (from_cli, from_nb, from_grid):
        for k in volatile:
            cfg.pop(k, None)
    assert from_cli == from_nb == from_grid
    assert from_cli.get("beta", from_cli.get("kl_coef")) == 0.2 and from_cli["seed"] == 1


@pytest.mark.parametrize("notebook,method,field,value", [
    ("04_preference.ipynb", "dpo", "warmup_steps", 3),  # a TRL field no notebook names
    ("03_rl.ipynb", "ppo", "vf_coef", 0.3),  # a field of our PPO's config no notebook names
])
def test_any_config_field_reaches_the_command_line_a_grid_and_a_notebook(capsys, tmp_path, notebook, method, field,
                                                                           value):
    """One schema: a config field that no notebook names (a new one needs only its declaration) is an option of the
    command line, a grid's stage parameter or ``--set``, and a notebook's parameter through its one ``overrides``
    dict, checked against the schema; a misspelt one is refused with the close match."""
    assert field not in grids.notebook_parameters(grids.NOTEBOOKS / notebook)
    from_cli = _from_cli(capsys, method, {field: value})
    from_nb = _from_notebook(notebook, {"method": method, "overrides": {field: value}})
    from_grid = _from_grid(tmp_path, notebook, {"method": method, field: value})
    assert from_cli[field] == from_nb[field] == from_grid[field] == value
    _, jobs = grids.load_grid(PACKAGE.parent / "grids" / "ci.yaml", {"model": "x", field: value})  # --set reaches its arms
    trained = [j for j in jobs if "method" in grids.notebook_parameters(j.notebook)]
    reached = [j for j in trained if (j.params.get("overrides") or {}).get(field) == value]
    assert reached, "no job of the grid got it"
    for j in trained:  # every job whose arm has the field, and only those
        arm, cfg = grids.job_config(j)
        assert (j in reached) == (field in train.config_fields(arm)), (j.label, arm)
        assert j not in reached or getattr(cfg, field) == value
    with pytest.raises(ValueError, match=f"did you mean {field}"):
        grids.load_grid(PACKAGE.parent / "grids" / "ci.yaml", {"model": "x", field[:-1] + "x": value})


def test_arm_names_and_aliases_resolve_in_one_place():
    assert train.make_config("ipo", beta=0.5)[1].loss_type == ["ipo"]
    arm, cfg = train.make_config("ppo", beta=0.2, max_steps=3)  # the common names map onto PPO's own fields
    assert (arm, cfg.kl_coef, cfg.iterations) == ("ppo", 0.2, 3)
    with pytest.raises(ValueError, match="did you mean 'learning_rate'"):
        train.make_config("dpo", learning_rat=1e-4)
    with pytest.raises(ValueError, match="beta must be > 0"):
        train.make_config("dpo", beta=0)


@pytest.mark.parametrize("argv,message", [
    (["train", "ipo", "--beta", "0.5", "--max-stepz", "2"], "did you mean 'max_steps'"),
    (["train", "ppo", "--beta", "-1"], "kl_coef must be >= 0"),
    (["train", "dpo", "--beta", "0"], "beta must be > 0"),
    (["train", "dpo", "--max-steps", "two"], "max_steps='two' should be a int"),
    (["train", "nosuch"], "Unknown method 'nosuch'"),
    (["train", "dpo", "--sft-run", "/no/such/run"], "has no adapter/ folder"),
    (["train", "dpo", "--beta"], "--beta needs a value"),
    (["evaluate", "--n-promts", "3"], "did you mean --n-prompts"),
    (["evaluate", "--n-prompts", "0"], "n_prompts must be >= 1"),
])
def test_bad_command_lines_exit_2_with_a_clear_message(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_command_line_values_parse_as_the_grids_do():
    assert cli.parse_value("2e-4") == 2e-4 and cli.parse_value("3") == 3 and cli.parse_value("false") is False
    assert cli.parse_value("sigmoid,sft") == ["sigmoid", "sft"] and cli.parse_value("none") is None
    assert cli.parse_value("embedded:smollm2-135m-instruct") == "embedded:smollm2-135m-instruct"
    assert cli.parse_fields(["--max-steps=4", "--loss-type", "ipo"]) == {"max_steps": 4, "loss_type": "ipo"}


@pytest.mark.parametrize("mistake", ["missing model path", "bad grid key", "bad data file"])
def test_a_mistake_found_after_parsing_is_one_error_line_and_exit_2(capsys, tmp_path, mistake):
    """Mistakes found past argparse (when the arm loads a model or its data, when the sweep reads its grid): one
    `error:` line naming the thing and what to do, exit code 2, no traceback; ``--debug`` keeps the traceback (the
    exception itself)."""
    runs_dir = ["--runs-dir", str(tmp_path / "runs")]
    bad_file = tmp_path / "pairs.jsonl"
    bad_file.write_text('{"prompt": "Hi", "chosen": "Hello"\n')
    argv, message, error = {
        "missing model path": (["train", "ppo", "--reward-model", str(tmp_path / "no-such-rm"), "--max-steps", "1"],
                               f"Model path '{tmp_path / 'no-such-rm'}' does not exist", FileNotFoundError),
        "bad grid key": (["sweep", str(Path(__file__).resolve().parents[1] / "grids" / "ci.yaml"), "--set", "n_trian=3"], "did you mean n_train", ValueError),
        "bad data file": (["train", "dpo", "--data-source", str(bad_file), "--max-steps", "1"],
                          f"{bad_file} line 1, field '<json>': not valid JSON", ValueError),
    }[mistake]
    assert cli.main([*argv, *runs_dir]) == 2
    err = capsys.readouterr().err
    assert "workbench: error: " in err and message in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1, err
    runs_made = list((tmp_path / "runs").iterdir()) if (tmp_path / "runs").exists() else []
    assert all(p.name.endswith(".failed") for p in runs_made), runs_made  # no run finished; a failed one says so
    with pytest.raises(error, match=message.split("'")[0][:20]):
        cli.main([*argv, *runs_dir, "--debug"])


_IMPORT_PROBE = """
import importlib, json, os, pkgutil, random
import numpy as np, torch
import trl.trainer.dpo_trainer  # a dependency's own import draws from Python's global RNG (TRL 1.16's chain): not ours
env, py, npy, th = dict(os.environ), random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()
import workbench
from workbench.core import malloc
names = sorted(m.name for m in pkgutil.walk_packages(workbench.__path__, "workbench.") if m.name != "workbench.__main__")
for name in names:
    importlib.import_module(name)
changed = sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k))
print(json.dumps({"modules": len(names), "env": changed, "random": random.getstate() != py,
                  "numpy": np.random.get_state()[1].tolist() != npy, "torch": not torch.equal(torch.get_rng_state(), th),
                  "malloc": malloc.policy()["policy"]}))
"""


def test_importing_the_workbench_does_no_work():
    """Importing ``workbench`` and every module of it changes no environment variable, no RNG state and no allocator
    setting: those belong to the entry points and the run's config. (TRL's trainers are imported first: importing
    them draws from Python's global RNG by itself, which a run's seed, set first thing in ``Run``, overrides.)"""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["modules"] > 30
    assert seen == {"modules": seen["modules"], "env": [], "random": False, "numpy": False, "torch": False,
                    "malloc": "not set"}


def test_every_environment_variable_is_declared_once_and_read_through_settings():
    """The WORKBENCH_* variables: each declared with its meaning in ``settings.VARIABLES`` and read through
    ``settings.get`` (no module reads ``os.environ`` for one itself); every one the package names is declared."""
    import re

    from workbench.core import settings

    named, direct = set(), []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        named |= set(re.findall(r"WORKBENCH_[A-Z_]+", text))
        if path.stem != "settings":
            direct += [f"{path.name}: {m}" for m in re.findall(r"os\.environ(?:\.get)?\W+[\"']WORKBENCH_\w+", text)]
    assert named <= set(settings.VARIABLES), named - set(settings.VARIABLES)
    assert not direct, direct
    with pytest.raises(KeyError, match="not one of the workbench's environment variables"):
        settings.get("WORKBENCH_NOSUCH")
