"""``mesagen train`` and ``mesagen eval`` subcommands (wired into ``mesagen.cli`` by ``add_subparsers``).

    mesagen train CONFIG [--steps N] [--out DIR] [--seed S]
    mesagen train --resume RUN_DIR
    mesagen eval RUN_DIR

Exit status: 0 on success, 2 on a bad config / missing layer / missing run (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from mesagen.errors import MesagenError


def cmd_train(args: argparse.Namespace) -> int:
    """Handler of ``mesagen train``; returns the exit status."""
    from mesagen.runtime.config import load_config
    from mesagen.runtime.train import train
    try:
        if args.resume:
            if args.config or args.steps is not None or args.seed is not None or args.out or args.overwrite:
                print("mesagen train: --resume takes only RUN_DIR (the run's config.yaml is used as is)",
                      file=sys.stderr)
                return 2
            run_dir = Path(args.resume)
            if not (run_dir / "checkpoint.eqx").exists():
                print(f"mesagen train: {run_dir}: no checkpoint.eqx to resume from", file=sys.stderr)
                return 2
            train(load_config(run_dir / "config.yaml"), run_dir, resume=True)
            return 0
        if not args.config:
            print("mesagen train: give CONFIG or --resume RUN_DIR", file=sys.stderr)
            return 2
        config = load_config(args.config).with_overrides(steps=args.steps, seed=args.seed)
        run_dir = Path(args.out) if args.out else Path("runs") / config.name
        if (run_dir / "checkpoint.eqx").exists():
            if not args.overwrite:
                print(f"mesagen train: {run_dir} already holds a run; use --resume {run_dir}, --overwrite or "
                      "another --out", file=sys.stderr)
                return 2
            shutil.rmtree(run_dir)  # a run folder (it holds a checkpoint): start afresh
        train(config, run_dir)
        print(f"run folder: {run_dir}")
        return 0
    except MesagenError as exc:
        print(f"mesagen train: {exc}", file=sys.stderr)
        return 2


def cmd_eval(args: argparse.Namespace) -> int:
    """Handler of ``mesagen eval``; returns the exit status."""
    from mesagen.runtime.evaluate import evaluate_run
    try:
        evaluate_run(args.run_dir)
    except (MesagenError, FileNotFoundError) as exc:
        print(f"mesagen eval: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {Path(args.run_dir) / 'eval.json'} and {Path(args.run_dir) / 'per_t.png'}")
    return 0


def add_subparsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train`` and ``eval`` on an argparse subparsers object; each sets ``func`` to its handler."""
    p = subparsers.add_parser("train", help="train a model on a paper task (YAML run config)")
    p.add_argument("config", nargs="?", help="run config YAML (e.g. configs/default.yaml)")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--seed", type=int, help="override train.seed")
    p.add_argument("--out", help="run folder (default runs/NAME)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a finished or interrupted run in the run folder")
    p.set_defaults(func=cmd_train)
    e = subparsers.add_parser("eval", help="per-t loss of a trained run against the baselines, with a figure")
    e.add_argument("run_dir", help="run folder written by mesagen train")
    e.set_defaults(func=cmd_eval)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python3 -m mesagen.runtime.cli_train train ...``) until ``mesagen.cli`` wires it."""
    parser = argparse.ArgumentParser(prog="mesagen")
    add_subparsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
