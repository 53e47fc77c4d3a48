"""Command line: ``python -m workbench main`` / ``train METHOD`` / ``evaluate [RUN ...]`` / ``sweep GRID`` / ``paper`` /
``score`` (or the ``workbench`` script)."""

from __future__ import annotations

import argparse
import dataclasses
import sys


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: give one or more integers >= 0, e.g. 0,1,2")
    return seeds


def main(argv: list[str] | None = None) -> int:
    from . import pipeline

    parser = argparse.ArgumentParser(prog="workbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_study = sub.add_parser("main", help="the whole study on the embedded default: grids/main.yaml, figures, paper")
    p_study.add_argument("--grid", default=str(pipeline.MAIN_GRID), help="(default: grids/main.yaml)")
    p_study.add_argument("--runs-dir", help="runs root (default: the grid's runs_dir, runs/main)")
    p_study.add_argument("--figures", default="figures", help="where the figures go (default: %(default)s)")
    p_study.add_argument("--paper", default="papers/draft.md", help="the filled paper draft (default: %(default)s)")
    p_study.add_argument("--seeds", type=_seed_list, help="comma-separated seeds, e.g. 0,1,2: the study once per seed "
                         "(default: the grid's own); finished runs of other seeds are kept")
    p_main = sub.add_parser("score", help="score held-out pairs under a fresh policy (see workbench/pipeline.py)")
    defaults = pipeline.ScoreConfig()
    for f in dataclasses.fields(pipeline.ScoreConfig):
        if f.name == "model":
            continue
        value = getattr(defaults, f.name)
        kind = next((t for t in (int, float) if t.__name__ in str(f.type).split(" | ")), str)  # "int | None" -> int
        p_main.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=value, help=f"(default: {value})")
    p_main.add_argument("--model", default=defaults.model.model_name_or_path,
                        help="policy: hub name, local directory or embedded:<name> (default: %(default)s)")
    p_main.add_argument("--no-4bit", action="store_true", help="load the base unquantized instead of NF4 4-bit")
    p_train = sub.add_parser("train", help="train one arm and print its run folder")
    p_train.add_argument("method", help="sft, dpo, kto, orpo, simpo, reward, ppo, rloo or grpo")
    p_train.add_argument("--loss-type", help="DPO family only: e.g. sigmoid, ipo, hinge, or sigmoid,bco_pair,sft")
    p_train.add_argument("--loss-weights", help="weights for a combined --loss-type, e.g. 0.8,0.2,1.0")
    p_train.add_argument("--beta", type=float)
    p_train.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (ppo: iterations)")
    p_train.add_argument("--reward-model", help="ppo/rloo/grpo: reward run folder or sequence-classifier name/path")
    p_train.add_argument("--gold-reward-model", help="ppo/rloo/grpo: a second reward model, only measured")
    p_train.add_argument("--kl-coef", type=float, help="ppo: β of score − β·KL (rloo/grpo: use --beta)")
    p_train.add_argument("--half", choices=["a", "b"], help="train on one half of the prompts (e.g. proxy vs gold RM)")
    p_train.add_argument("--learning-rate", type=float)
    p_train.add_argument("--sft-run", help="SFT run folder to start from (it becomes the reference)")
    p_train.add_argument("--model", help="policy: hub name, local directory or embedded:<name>")
    p_train.add_argument("--no-4bit", action="store_true")
    p_train.add_argument("--seed", type=int, default=0)
    p_train.add_argument("--run-name", default="default")
    p_train.add_argument("--split", default="test", help="HH-RLHF split file to read (default: test, the local one)")
    p_train.add_argument("--data-source", help="local hh-rlhf directory or 'hub'")
    p_train.add_argument("--n-train", type=int)
    p_train.add_argument("--n-score", type=int, default=64)
    p_eval = sub.add_parser("evaluate", help="evaluate run folders; write the results table and every figure")
    p_eval.add_argument("runs", nargs="*", help="run folders (default: every complete run under --runs-dir)")
    p_eval.add_argument("--runs-dir", help="runs root (default: $WORKBENCH_RUNS, else ./runs)")
    p_eval.add_argument("--name", default="default", help="evaluation name: <run>/eval/<name>/")
    for name, kind in (("n_prompts", int), ("n_samples", int), ("n_pairs", int), ("max_new_tokens", int),
                       ("temperature", float), ("top_p", float), ("seed", int)):
        p_eval.add_argument(f"--{name.replace('_', '-')}", type=kind)
    p_eval.add_argument("--proxy-reward-model", help="default: the reward_model the RL runs were trained with")
    p_eval.add_argument("--gold-reward-model", help="default: the gold_reward_model the RL runs recorded")
    p_eval.add_argument("--out", default="figures", help="where results.csv and the figures go (default: %(default)s)")
    p_sweep = sub.add_parser("sweep", help="run or resume a grid of notebook executions (see workbench/sweep.py)")
    p_sweep.add_argument("grid", help="grid file, e.g. grids/main.yaml")
    p_sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="replace a default parameter of every job (YAML value), e.g. --set model=/path")
    p_sweep.add_argument("--runs-dir", help="runs root (default: the grid's runs_dir)")
    p_sweep.add_argument("--no-retry", action="store_true", help="do not run failed jobs again on resume")
    p_paper = sub.add_parser("paper", help="fill papers/template.md from the evaluated runs into papers/draft.md")
    p_paper.add_argument("--runs-dir", default="runs/main")
    p_paper.add_argument("--name", default="default", help="evaluation name")
    p_paper.add_argument("--figures", default="figures")
    p_paper.add_argument("--out", default="papers/draft.md")
    args = parser.parse_args(argv)

    if args.command == "sweep":
        import yaml

        from .sweep import run_sweep

        overrides = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                parser.error(f"--set takes KEY=VALUE, got '{item}'")
            overrides[key] = yaml.safe_load(value)
        result = run_sweep(args.grid, overrides, runs_dir=args.runs_dir, retry_failed=not args.no_retry)
        if result.table is not None:
            from .results import aggregate

            print(aggregate(result.table).to_string(index=False))
        return 1 if result.failed else 0
    if args.command == "paper":
        from . import paper
        from .results import results_table
        from .runs import list_runs

        table = results_table(list(list_runs(args.runs_dir)["path"]), args.name)
        print(f"[paper] {paper.build(table, args.out, args.figures)}")
        return 0
    if args.command == "main":
        pipeline.run_study(args.grid, args.runs_dir, args.figures, args.paper, seeds=args.seeds)
        return 0
    if args.command == "score":
        from .models import ModelConfig

        kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(pipeline.ScoreConfig) if f.name != "model"}
        cfg = pipeline.ScoreConfig(**kwargs, model=ModelConfig(model_name_or_path=args.model, load_in_4bit=not args.no_4bit))
        pipeline.run_score(cfg)
    elif args.command == "train":
        from . import train
        from .models import ModelConfig

        if args.method not in train.METHODS:
            parser.error(f"unknown method '{args.method}'; choose from {', '.join(train.METHODS)}")
        kw = dict(seed=args.seed, run_name=args.run_name, sft_run=args.sft_run,
                  data=train.DataConfig(split=args.split, source=args.data_source, n_train=args.n_train,
                                        n_score=args.n_score, half=args.half))
        if args.method == "ppo":
            kw.update(iterations=args.max_steps if args.max_steps > 0 else 100)
        else:
            kw.update(max_steps=args.max_steps)
        for name in ("reward_model", "gold_reward_model", "kl_coef"):
            if getattr(args, name) is not None:
                kw[name] = getattr(args, name)
        if args.model or args.no_4bit:
            kw["model"] = ModelConfig(**({"model_name_or_path": args.model} if args.model else {}), load_in_4bit=not args.no_4bit)
        for name in ("beta", "learning_rate"):
            if getattr(args, name) is not None:
                kw[name] = getattr(args, name)
        if args.loss_type:
            kw["loss_type"] = args.loss_type.split(",")
        if args.loss_weights:
            kw["loss_weights"] = [float(w) for w in args.loss_weights.split(",")]
        train.train(args.method, train.METHODS[args.method][0](**kw))
    elif args.command == "evaluate":
        from pathlib import Path

        from . import evaluate, figures, results
        from .runs import default_root

        fields = ("name", "n_prompts", "n_samples", "n_pairs", "max_new_tokens", "temperature", "top_p", "seed",
                  "proxy_reward_model", "gold_reward_model")
        cfg = evaluate.EvalConfig(**{f: getattr(args, f) for f in fields if getattr(args, f) is not None})
        target = args.runs if len(args.runs) > 1 else (args.runs[0] if args.runs else str(args.runs_dir or default_root()))
        table = evaluate.evaluate_runs(target, cfg)  # one path: a runs root or a single run folder
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
