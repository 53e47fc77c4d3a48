"""Command line: ``python -m workbench main`` (or the ``workbench`` script)."""

from __future__ import annotations

import argparse
import dataclasses
import sys


def main(argv: list[str] | None = None) -> int:
    from . import pipeline

    parser = argparse.ArgumentParser(prog="workbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_main = sub.add_parser("main", help="the main job on the embedded default (see workbench/pipeline.py)")
    defaults = pipeline.MainConfig()
    for f in dataclasses.fields(pipeline.MainConfig):
        if f.name == "model":
            continue
        value = getattr(defaults, f.name)
        kind = type(value) if value is not None else str
        p_main.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=value, help=f"(default: {value})")
    p_main.add_argument("--model", default=defaults.model.model_name_or_path,
                        help="policy: hub name, local directory or embedded:<name> (default: %(default)s)")
    p_main.add_argument("--no-4bit", action="store_true", help="load the base unquantized instead of NF4 4-bit")
    args = parser.parse_args(argv)

    if args.command == "main":
        from .models import ModelConfig

        kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(pipeline.MainConfig) if f.name != "model"}
        cfg = pipeline.MainConfig(**kwargs, model=ModelConfig(model_name_or_path=args.model, load_in_4bit=not args.no_4bit))
        pipeline.run_main(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
