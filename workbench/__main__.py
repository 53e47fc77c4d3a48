"""Command line: ``python -m workbench main`` / ``train METHOD [--name value ...]`` / ``evaluate [RUN ...]`` /
``sweep GRID`` / ``paper`` (or the ``workbench`` script).

``train`` takes every field of the arm's config as ``--name value`` (``--max-steps 4``, ``--beta 0.2``,
``--loss-type sigmoid,sft``, ``--load-in-4bit false``), built by ``train.make_config`` as the notebooks and the grids
build theirs; ``--print-config`` prints the config and stops. A bad name or value exits with code 2 and says what
to change, before anything loads. A user's mistake found later (a missing model path, bad data) ends the command
with one ``error:`` line and exit code 2, no traceback (``--debug`` keeps it); a bug keeps its traceback.
``--verbose`` (debug lines too) or ``--quiet`` (warnings and errors only), anywhere on the line, set how much the
workbench tells while it works (``console.py``), in a sweep's notebooks too."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: give one or more integers >= 0, e.g. 0,1,2")
    return seeds


def parse_value(text: str):
    """A value written on the command line: JSON where it parses (numbers, true/false/null, [lists]), "none" as
    None, a comma-separated list as a list, else the text itself."""
    if text.lower() in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except ValueError:
        pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return [parse_value(t) for t in text.split(",")] if "," in text else text


def parse_fields(tokens: list[str]) -> dict:
    """``--name value`` / ``--name=value`` pairs as {name: value} (dashes in names become underscores)."""
    out, i = {}, 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) < 3:
            raise ValueError(f"expected --name value, got '{tok}'")
        name, sep, value = tok[2:].partition("=")
        if not sep:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise ValueError(f"--{name} needs a value")
            value, i = tokens[i + 1], i + 1
        out[name.replace("-", "_")] = parse_value(value)
        i += 1
    return out


def _split_fields(argv: list[str], sub: dict) -> tuple[list[str], list[str]]:
    """(argv for argparse, the config-field tokens): for ``train`` and ``evaluate``, every ``--name [value]`` that is
    not one of the subcommand's own options is a config field (its value may look like a negative number)."""
    if not argv or argv[0] not in ("train", "evaluate"):
        return argv, []
    known = {o for a in sub[argv[0]]._actions for o in a.option_strings}
    keep, fields, i = argv[:1], [], 1
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--") and tok.split("=")[0] not in known:
            fields.append(tok)
            if "=" not in tok and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                fields.append(argv[i + 1])
                i += 1
        else:
            keep.append(tok)
        i += 1
    return keep, fields


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    """(the parser, its subcommands' parsers by name). ``train`` and ``evaluate`` also take every field of their
    config as ``--name value`` (``parse_fields``)."""
    from .core import methods
    from .orchestration import executors, pipeline

    parser = argparse.ArgumentParser(prog="workbench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_study = sub.add_parser("main", allow_abbrev=False,
                             help="the whole study on the embedded default: grids/main.yaml, figures, paper")
    p_study.add_argument("--grid", default=str(pipeline.MAIN_GRID), help="(default: grids/main.yaml)")
    p_study.add_argument("--runs-dir", help="runs root (default: the grid's runs_dir, runs/main)")
    p_study.add_argument("--figures", default="figures", help="where the figures go (default: %(default)s)")
    p_study.add_argument("--paper", default="papers/draft.md", help="the filled paper draft (default: %(default)s)")
    p_study.add_argument("--seeds", type=_seed_list, help="comma-separated seeds, e.g. 0,1,2: the study once per seed "
                         "(default: the grid's own); finished runs of other seeds are kept")
    p_study.add_argument("--executor", choices=executors.EXECUTORS,
                         help="where the jobs run (default: the grid's executor; grids/main.yaml: local, side by side "
                              "on this machine); see workbench/orchestration/executors.py")
    p_train = sub.add_parser("train", allow_abbrev=False, help="train one arm and print its run folder; any config field as --name value",
                             description="Train one arm. Every field of its config is an option: --name value "
                             "(e.g. --max-steps 4 --beta 0.2 --n-train 64 --model embedded:smollm2-135m-instruct "
                             "--load-in-4bit false --loss-type sigmoid,sft). --print-config prints the config and stops.")
    p_train.add_argument("method", help=", ".join(methods.FACTS) + " (or any DPO loss type: ipo, hinge, ...); "
                         "train METHOD --help lists its every parameter with its help")
    p_train.add_argument("--print-config", action="store_true", help="print the config as JSON and stop")
    p_eval = sub.add_parser("evaluate", allow_abbrev=False, help="evaluate run folders; write the results table and every figure; "
                            "any EvalConfig field as --name value")
    p_eval.add_argument("runs", nargs="*", help="run folders (default: every complete run under --runs-dir)")
    p_eval.add_argument("--runs-dir", help="runs root (default: $WORKBENCH_RUNS, else ./runs)")
    p_eval.add_argument("--out", default="figures", help="where results.csv and the figures go (default: %(default)s)")
    p_sweep = sub.add_parser("sweep", allow_abbrev=False, help="run or resume a grid of notebook executions (see workbench/orchestration/sweep.py)")
    p_sweep.add_argument("grid", help="grid file, e.g. grids/main.yaml")
    p_sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="set a parameter for every job that takes it, in place of the grid's default (a "
                              "stage that names its own keeps it, and the sweep says so), e.g. --set n_train=128; "
                              "STAGE.KEY=VALUE sets one stage over its own, e.g. --set proxy.max_steps=20")
    p_sweep.add_argument("--runs-dir", help="runs root (default: the grid's runs_dir)")
    p_sweep.add_argument("--no-retry", action="store_true", help="do not run failed jobs again on resume")
    p_sweep.add_argument("--executor", choices=executors.EXECUTORS,
                         help="where jobs run: here one at a time (serial, the default unless the grid names one), side "
                              "by side on this machine (local), as Ray tasks, or as Slurm jobs (submitit); see "
                              "workbench/orchestration/executors.py")
    p_sweep.add_argument("--address", help="with --executor ray: join this Ray cluster (e.g. auto, or ray://host:10001) "
                                           "instead of starting a local one")
    p_paper = sub.add_parser("paper", allow_abbrev=False, help="fill papers/template.md from the evaluated runs into papers/draft.md")
    p_paper.add_argument("--runs-dir", default="runs/main")
    p_paper.add_argument("--name", default="default", help="evaluation name")
    p_paper.add_argument("--figures", default="figures")
    p_paper.add_argument("--out", default="papers/draft.md")
    return parser, {"main": p_study, "train": p_train, "evaluate": p_eval, "sweep": p_sweep, "paper": p_paper}


# a user's mistakes: a missing path, a bad value, bad data; each carries a message that says what to do. They end
# the command with "error: <message>" and exit code 2; any other exception is a bug and keeps its traceback
USER_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError)


def main(argv: list[str] | None = None) -> int:
    """The command line; ``--debug`` anywhere keeps the traceback of a user's mistake too."""
    from .core import malloc

    malloc.keep_freed_memory()  # before any tensor exists (malloc.py): the command line is an entry point
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    verbosity = "debug" if "--verbose" in argv else "warning" if "--quiet" in argv else None
    argv = [a for a in argv if a not in ("--debug", "--verbose", "--quiet")]
    if verbosity:
        from .core import console

        os.environ[console.ENV] = verbosity  # a sweep's kernels and workers show as much
        console.configure(verbosity)
    try:
        return _main(argv)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"workbench: error: {e}\n(add --debug for the traceback)", file=sys.stderr)
        return 2


def arm_help(method: str) -> str:
    """Every flat parameter of ``method`` (``arms.config_fields``) with its type, default and help (the config
    field's: ``config.field_help``), grouped: the arm's own, the model's, the data's; aliases point to their field."""
    import dataclasses
    import textwrap

    from .training import arms
    from .training.config import field_help

    arm_name, fixed = arms.arm_of(method)
    arm = arms.ARMS[arm_name]
    model_cls = next(f for f in dataclasses.fields(arm.config) if f.name == "model").default_factory
    data_cls = next(f for f in dataclasses.fields(arm.config) if f.name == "data").default_factory
    groups = [(f"{method} ({arm.config.__name__}; TRL's options included)", arm.config, None),
              ("the model (cfg.model, models.ModelConfig)", model_cls, arms.MODEL_PARAMS),
              ("the data (cfg.data, data.DataConfig)", data_cls, arms.DATA_PARAMS)]
    aliases = dict(arm.aliases)
    lines = [f"Parameters of '{method}' (--name value; lists as a,b; booleans true/false):"]
    for title, cls, names in groups:
        obj = cls()  # a class, or a config's default_factory (RewardArgs': a lambda)
        helps = field_help(type(obj))
        fields_ = {f.name: f for f in dataclasses.fields(obj) if f.init}
        flat = names or {k: k for k in fields_ if k not in ("model", "data")}
        lines.append(f"\n{title}:")
        for flag, name in sorted(flat.items()):
            default = fixed.get(name, getattr(obj, name, None))
            lines.append(f"  --{flag.replace('_', '-')}  ({fields_[name].type}; default {default!r})")
            lines += textwrap.wrap(helps.get(name) or "", 110, initial_indent=" " * 6, subsequent_indent=" " * 6)
    if aliases:
        lines.append("\ncommon names, the same idea across arms:")
        lines += [f"  --{a.replace('_', '-')}  = --{f.replace('_', '-')}" for a, f in sorted(aliases.items())]
    return "\n".join(lines)


def config_page() -> str:
    """docs/config.md: every parameter the workbench declares or re-defaults, arm by arm, with its help (TRL's
    own options are listed by ``train METHOD --help``); generated from the configs (a test keeps the page current)."""
    import dataclasses

    from .core import settings
    from .measurement import evaluate
    from .training import arms
    from .training.config import RLFields, RunFields, field_help

    def declared(cls, own: bool) -> list:  # the fields a workbench class declares (or re-defaults), in order
        names = []
        for klass in [cls] if own else reversed(cls.__mro__):
            if klass.__module__.startswith("workbench"):
                names += [n for n in vars(klass).get("__annotations__", {}) if n not in names]
        return [f for f in dataclasses.fields(cls) if f.name in names and f.init]

    def table(cls, skip=(), own=False) -> list[str]:
        helps = field_help(cls)
        rows = ["| parameter | default | what it is |", "|---|---|---|"]
        for f in declared(cls, own):
            if f.name in skip:
                continue
            # the declared default (not what __post_init__ makes of it on this machine: bf16=None follows the CPU)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = type(default).__name__ if dataclasses.is_dataclass(default) else repr(default)
            text = helps.get(f.name, "").replace("|", "\\|")
            rows.append(f"| `{f.name}` | `{shown}` | {text} |")
        return rows

    out = ["# Config fields", "",
           "Generated from the config classes (`python -m workbench config-docs > docs/config.md`; a test keeps it "
           "current): every", "parameter the workbench declares or gives another default, with the help written beside "
           "its declaration", "(`config.field_help`). TRL's own options of each arm are parameters too; `python -m "
           "workbench train METHOD --help`", "lists them all with TRL's help. A notebook takes any of them through its "
           "`overrides` dict, a grid as a", "stage parameter or `--set`.", ""]
    model_cls = arms.ARMS["dpo"].config().model.__class__
    trl_arm = arms.ARMS["dpo"].config.__mro__[1]  # the workbench's fields and defaults on every TRL arm's config
    for title, cls in (("Every arm: the model (`models.ModelConfig`)", model_cls),
                       ("Every arm: the data (`data.DataConfig`)", arms.DataConfig),
                       ("Every arm (`config.RunFields`)", RunFields),
                       ("Every TRL arm: the workbench's defaults of TRL options", trl_arm),
                       ("The arms that sample their own responses (`config.RLFields`)", RLFields)):
        out += [f"## {title}", "", *table(cls, ("model", "data"), own=cls is trl_arm), ""]
    for name, arm in arms.ARMS.items():
        out += [f"## `{name}` (`{arm.config.__module__}.{arm.config.__name__}`)", "",
                *table(arm.config, ("model", "data"), own=True), ""]
    out += ["## The evaluation (`evaluate.EvalConfig`)", "", *table(evaluate.EvalConfig), ""]
    out += ["## Environment variables (`settings.VARIABLES`)", "", "Each run's `env.json` records those set.", "",
            "| variable | what it does |", "|---|---|", *(f"| `{k}` | {v} |" for k, v in settings.VARIABLES.items()), ""]
    return "\n".join(out)


def _main(argv: list[str]) -> int:
    from .orchestration import pipeline

    parser, sub = build_parser()
    if argv == ["config-docs"]:  # docs/config.md, from the configs' declarations
        print(config_page())
        return 0
    if argv[:1] == ["train"] and ({"-h", "--help"} & set(argv)) and len([a for a in argv[1:] if a[:1] != "-"]) == 1:
        sub["train"].print_help()  # ``train <method> --help``: and every field of that arm, with its help
        print("\n" + arm_help(next(a for a in argv[1:] if a[:1] != "-")))
        return 0
    p_train, p_eval = sub["train"], sub["evaluate"]
    argv, field_tokens = _split_fields(argv, sub)
    args = parser.parse_args(argv)
    try:
        fields = parse_fields(field_tokens)
    except ValueError as e:
        sub[args.command].error(str(e))

    if args.command == "sweep":
        from .orchestration.sweep import run_sweep

        overrides = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                parser.error(f"--set takes KEY=VALUE, got '{item}'")
            overrides[key] = parse_value(value)
        if args.address and args.executor != "ray":
            parser.error("--address joins a Ray cluster: it needs --executor ray")
        # the grid's problems (all listed, before anything ran) are a user's mistake: main() prints them, exit 2
        result = run_sweep(args.grid, overrides, runs_dir=args.runs_dir, retry_failed=not args.no_retry,
                           executor=args.executor, address=args.address)
        if result.table is not None:
            from .measurement.results import aggregate

            print(aggregate(result.table).to_string(index=False))
        return 1 if result.failed else 0
    if args.command == "paper":
        from .measurement.results import results_table
        from .reporting import paper

        print(f"[paper] {paper.build(results_table(args.runs_dir, args.name), args.out, args.figures)}")
        return 0
    if args.command == "main":
        pipeline.run_study(args.grid, args.runs_dir, args.figures, args.paper, seeds=args.seeds, executor=args.executor)
        return 0
    if args.command == "train":
        from .modeling.runs import to_jsonable
        from .training import train

        try:
            arm, cfg = train.make_config(args.method, **fields)
            if not args.print_config:
                train.validate(arm, cfg)
        except (ValueError, TypeError, FileNotFoundError) as e:
            p_train.error(str(e))
        if args.print_config:
            print(json.dumps({"method": arm, "config": to_jsonable(cfg)}, indent=1))
            return 0
        train.train(arm, cfg)
    elif args.command == "evaluate":
        import dataclasses
        import difflib
        from pathlib import Path

        from .measurement import evaluate, results
        from .modeling.runs import default_root
        from .reporting import figures

        known = [f.name for f in dataclasses.fields(evaluate.EvalConfig) if f.name != "data"]
        for name in fields:
            if name not in known:
                near = difflib.get_close_matches(name, known, n=1)
                p_eval.error(f"unknown option --{name.replace('_', '-')}"
                             + (f" (did you mean --{near[0].replace('_', '-')}?)" if near else ""))
        try:
            cfg = evaluate.EvalConfig(**fields)
        except (ValueError, TypeError) as e:
            p_eval.error(str(e))
        target = args.runs if len(args.runs) > 1 else (args.runs[0] if args.runs else str(args.runs_dir or default_root()))
        table = results.results_table(evaluate.evaluate_runs(target, cfg), cfg.name)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "results.csv", index=False)
        results.aggregate(table).to_csv(out / "results_by_method.csv", index=False)
        paths = figures.export_all(table, out)
        cols = [c for c in ("method", "name", "beta", "n_seeds", "eval/gold", "eval/kl", "win/chosen", "win/chosen_lc",
                            "win/sft", "pairs/accuracy", "compute/pipeline_flops") if c in results.aggregate(table)]
        print(results.aggregate(table)[cols].to_string(index=False))
        print(f"[evaluate] table: {out / 'results.csv'}, {out / 'results_by_method.csv'}; {len(paths)} figure files in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
