"""``mesagen train`` and ``mesagen eval`` subcommands (wired into ``mesagen.cli`` by ``add_subparsers``).

    mesagen train CONFIG [--steps N] [--out DIR] [--seed S] [--text PATH] [--overwrite] [--generated DIR] [DISTRIBUTED]
    mesagen train --resume RUN_DIR [--generated DIR] [DISTRIBUTED]

DISTRIBUTED (multi-host data parallelism, docs/parallel.md): ``--distributed`` calls
``jax.distributed.initialize()`` before anything else (cluster auto-detection: Slurm, Open MPI, TPU, or the
``JAX_COORDINATOR_ADDRESS`` environment variable); ``--coordinator HOST:PORT --num-processes N --process-id I``
pass its arguments explicitly (and imply ``--distributed``).
    mesagen eval RUN_DIR [--generated DIR]
    mesagen sample RUN_DIR --prompt TEXT --tokens N [--temperature T] [--seed S] [--generated DIR]

``--text PATH`` (a file or folder) sets ``task.corpus`` of a text config (docs/lm.md).

Exit status: 0 on success, 2 on a bad config / missing layer / missing run / missing dependency (one line per
mistake on stderr, no traceback), 130 / 143 after SIGINT / SIGTERM (the checkpoint is saved and the resume
command printed). This module imports no third-party package, so ``mesagen`` always offers ``train``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mesagen.errors import MesagenError

#: Third-party modules the trainer needs -> what to install if one is missing (jax ... tqdm are dependencies
#: of mesagen itself; numba only of the ``numba_cpu`` backend, the ``numba`` extra).
RUNTIME_MODULES = {"jax": "mesagen", "jaxlib": "mesagen", "equinox": "mesagen", "optax": "mesagen",
                   "matplotlib": "mesagen", "tqdm": "mesagen", "numpy": "mesagen", "numba": "mesagen[numba]"}


def missing_dependency(exc: ImportError) -> str | None:
    """The install hint for an ImportError caused by a missing third-party runtime module, else None (a bug)."""
    name = (getattr(exc, "name", None) or "").split(".")[0]
    if isinstance(exc, ModuleNotFoundError) and name in RUNTIME_MODULES:
        return (f"the trainer needs the Python package {name!r}, which is not installed; install it with: "
                f"python3 -m pip install '{RUNTIME_MODULES[name]}'")
    return None


def _fail(prog: str, exc: Exception) -> int:
    for line in str(exc).splitlines() or [type(exc).__name__]:
        print(f"{prog}: {line}", file=sys.stderr)
    return 2


def start_distributed(args: argparse.Namespace) -> None:
    """Call ``jax.distributed.initialize`` if ``--distributed`` or any of its explicit arguments was given.

    Must run before the first JAX computation of the process (the trainer's mesh then spans every process's
    devices). Arguments not given are left to JAX's cluster auto-detection.

    Raises:
        RuntimeError / ValueError: from JAX, e.g. when the coordinator cannot be reached or the cluster cannot
            be detected.
    """
    explicit = {"coordinator_address": getattr(args, "coordinator", None),
                "num_processes": getattr(args, "num_processes", None),
                "process_id": getattr(args, "process_id", None)}
    if getattr(args, "distributed", False) or any(v is not None for v in explicit.values()):
        import jax

        jax.distributed.initialize(**{k: v for k, v in explicit.items() if v is not None})


def cmd_train(args: argparse.Namespace) -> int:
    """Handler of ``mesagen train``; returns the exit status (0, 2 on bad input, 128 + signal if interrupted)."""
    try:
        from mesagen.runtime.config import load_config
        from mesagen.runtime.loader import use_generated_dir
        from mesagen.runtime.train import TrainingInterrupted, train
    except ImportError as exc:
        hint = missing_dependency(exc)
        if hint is None:
            raise
        print(f"mesagen train: {hint}", file=sys.stderr)
        return 2
    try:
        start_distributed(args)
    except (RuntimeError, ValueError) as exc:
        print(f"mesagen train: jax.distributed.initialize failed: {exc}", file=sys.stderr)
        return 2
    try:
        with use_generated_dir(args.generated):
            if args.resume:
                if (args.config or args.steps is not None or args.seed is not None or args.out or args.overwrite
                        or args.text):
                    print("mesagen train: --resume takes only RUN_DIR (the run's config.yaml is used as is)",
                          file=sys.stderr)
                    return 2
                run_dir = Path(args.resume)
                train(load_config(run_dir / "config.yaml", stored=True), run_dir, resume=True)
                print(f"run folder: {run_dir}")
                return 0
            if not args.config:
                print("mesagen train: give CONFIG or --resume RUN_DIR", file=sys.stderr)
                return 2
            loaded = load_config(args.config)
            if args.text is not None and not Path(args.text).exists():
                print(f"mesagen train: --text {args.text}: no such file or folder", file=sys.stderr)
                return 2
            config = loaded.with_overrides(steps=args.steps, seed=args.seed, text=args.text)
            change = loaded.schedule_change(config)
            if change:
                print(f"mesagen train: {change}")
            run_dir = Path(args.out) if args.out else Path("runs") / config.name
            train(config, run_dir, overwrite=args.overwrite)
            print(f"run folder: {run_dir}")
            return 0
    except TrainingInterrupted as exc:
        print(f"mesagen train: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except MesagenError as exc:
        return _fail("mesagen train", exc)


def cmd_eval(args: argparse.Namespace) -> int:
    """Handler of ``mesagen eval``; returns the exit status."""
    try:
        from mesagen.runtime.evaluate import evaluate_run
        from mesagen.runtime.loader import use_generated_dir
    except ImportError as exc:
        hint = missing_dependency(exc)
        if hint is None:
            raise
        print(f"mesagen eval: {hint}", file=sys.stderr)
        return 2
    try:
        with use_generated_dir(args.generated):
            evaluate_run(args.run_dir)
    except (MesagenError, FileNotFoundError) as exc:
        return _fail("mesagen eval", exc)
    print(f"wrote {Path(args.run_dir) / 'eval.json'} and {Path(args.run_dir) / 'per_t.png'}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """Handler of ``mesagen sample``: print the prompt's continuation; returns the exit status (2 on bad input)."""
    try:
        from mesagen.runtime.generate import sample_run
        from mesagen.runtime.loader import use_generated_dir
    except ImportError as exc:
        hint = missing_dependency(exc)
        if hint is None:
            raise
        print(f"mesagen sample: {hint}", file=sys.stderr)
        return 2
    try:
        with use_generated_dir(args.generated):
            text = sample_run(args.run_dir, args.prompt, args.tokens, temperature=args.temperature, seed=args.seed)
    except MesagenError as exc:
        return _fail("mesagen sample", exc)
    sys.stdout.write(args.prompt + text + "\n")
    return 0


def add_subparsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train`` and ``eval`` on an argparse subparsers object; each sets ``func`` to its handler."""
    p = subparsers.add_parser("train", help="train a model on a paper task (YAML run config)")
    p.add_argument("config", nargs="?", help="run config YAML (e.g. configs/default.yaml)")
    p.add_argument("--steps", type=int,
                   help="override train.steps (a warm-up + cosine schedule is rescaled in proportion)")
    p.add_argument("--seed", type=int, help="override train.seed")
    p.add_argument("--text", metavar="PATH",
                   help="text task: train on this file or folder (sets task.corpus; default corpus: the Python "
                        "standard library's sources)")
    p.add_argument("--out", help="run folder (default runs/NAME)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in the run folder (after the new config, layers and model check out; "
                        "only files mesagen wrote are replaced)")
    gen_help = ("folder holding NAME/layer_jax.py for generated:NAME (default: $MESAGEN_GENERATED, else "
                "./generated, else the checkout's generated/)")
    p.add_argument("--generated", metavar="DIR", help=gen_help)
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() first (cluster auto-detection); every "
                        "process runs the same command, process 0 writes the run folder (docs/parallel.md)")
    p.add_argument("--coordinator", metavar="HOST:PORT", help="jax.distributed coordinator address (process 0's)")
    p.add_argument("--num-processes", type=int, metavar="N", help="jax.distributed: number of processes")
    p.add_argument("--process-id", type=int, metavar="I", help="jax.distributed: this process's index, 0..N-1")
    p.set_defaults(func=cmd_train)
    e = subparsers.add_parser("eval", help="per-t loss of a trained run against the baselines, with a figure")
    e.add_argument("run_dir", help="run folder written by mesagen train")
    e.add_argument("--generated", metavar="DIR", help=gen_help)
    e.set_defaults(func=cmd_eval)
    s = subparsers.add_parser("sample", help="continue a prompt with a trained byte-level language model")
    s.add_argument("run_dir", help="run folder of a text run (task.kind: text)")
    s.add_argument("--prompt", default="", help="the context, UTF-8 (default: empty, starts from a newline)")
    s.add_argument("--tokens", type=int, default=200, help="bytes to generate (default 200)")
    s.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy (default 1)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    s.add_argument("--generated", metavar="DIR", help=gen_help)
    s.set_defaults(func=cmd_sample)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python3 -m mesagen.runtime.cli_train train ...``) until ``mesagen.cli`` wires it."""
    parser = argparse.ArgumentParser(prog="mesagen")
    add_subparsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
