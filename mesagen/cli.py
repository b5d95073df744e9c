"""``mesagen`` command line: thin subcommands over :mod:`mesagen.pipeline` and the runtime.

    mesagen build SPEC... [--out DIR] [--check] [--force]   compile specs into DIR/NAME/ (default ./generated)
    mesagen list [SPEC_DIR]                          specs with their parameters, inputs and forms
    mesagen derive SPEC                              print the derivation (Markdown + LaTeX)
    mesagen train CONFIG ... / mesagen eval RUN_DIR / mesagen sample RUN_DIR  (the trainer; see README, docs/lm.md)
    mesagen reproduce [--quick] [--only CLAIM] [--out DIR]   the paper's claims -> DIR/PAPER_RESULTS.md

Exit status: 0 success, 1 ``--check`` found drift, 2 bad input (spec, config or arguments). Errors are
one line on stderr naming the file, line, column and field -- never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mesagen.errors import MesagenError, SpecError


def _build(args: argparse.Namespace) -> int:
    from mesagen.pipeline import compile_file
    from mesagen.writer import drift, foreign, write_all

    files: dict[str, str] = {}
    bad: list[SpecError] = []
    for spec in args.specs:  # compile everything first: a bad spec writes nothing at all
        try:
            compiled = compile_file(spec, out=args.out)
        except SpecError as exc:  # go on: the problems of every spec on the command line are reported at once
            bad.append(exc)
            continue
        clash = set(files) & set(compiled.files)
        if clash:
            raise MesagenError(f"{spec}: spec name {compiled.spec.name!r} is used by another spec on the command line")
        files.update(compiled.files)
    if bad:
        raise MesagenError("\n".join(str(exc) for exc in bad))
    out = Path(args.out)
    if args.check:
        bad = drift(files, out)
        for rel in bad:
            print(f"drift: {out / rel} differs from what its spec generates", file=sys.stderr)
        if bad:
            print(f"mesagen: {len(bad)} generated file(s) are stale; run: mesagen build {' '.join(args.specs)}",
                  file=sys.stderr)
            return 1
        print(f"ok: {len(files)} generated file(s) are up to date")
        return 0
    clashes = [] if args.force else foreign(files, out)
    if clashes:  # a spec named like another spec's layer would silently replace it
        raise MesagenError("\n".join(f"{c}; rename the spec's 'name', choose another --out, or pass --force to "
                                     "overwrite" for c in clashes))
    for path in write_all(files, out):
        print(f"wrote {path}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from mesagen.pipeline import compile_file

    specs = sorted(Path(args.spec_dir).glob("*.yaml"))
    if not specs:
        raise MesagenError(f"{args.spec_dir}: no *.yaml specs found")
    for path in specs:
        c = compile_file(path, backends=())
        params = ", ".join(f"{p.name} [H] {p.domain} (init {p.init:g})" for p in c.ir.params) or "-"
        inputs = ", ".join(f"{i.name} [{','.join(i.shape)}] {i.space} {i.domain} ({i.role})"
                           for i in c.ir.inputs) or "-"
        extra = ""
        if c.ir.feature_map != "identity" or c.ir.default_scale != 1.0:
            extra = f"; feature map {c.ir.feature_map}, scale {c.ir.default_scale}"
        print(f"{c.spec.name:11s} {str(path):25s} solver={c.spec.solver.kind:12s} forms={','.join(c.ir.forms)}")
        print(f"{'':11s} parameters: {params}; inputs: {inputs}{extra}")
    return 0


def _derive(args: argparse.Namespace) -> int:
    from mesagen.pipeline import compile_file

    c = compile_file(args.spec, backends=("md",))
    sys.stdout.write(next(iter(c.files.values())))
    measured = [f"- {ch.name}: {ch.measured}" for ch in c.checks if ch.measured is not None]
    if measured:  # measured values differ from machine to machine: stdout only, never in a generated file
        sys.stdout.write("\n## Measured on this machine\n\n" + "\n".join(measured) + "\n")
    return 0


def parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``mesagen`` command."""
    from mesagen import __version__
    from mesagen.backends import CODEGEN_FORMAT
    from mesagen.pipeline import DEFAULT_OUT

    ap = argparse.ArgumentParser(prog="mesagen", description="Compile in-context-objective specs into sequence layers.")
    ap.add_argument("--version", action="version", version=f"mesagen {__version__} (codegen format {CODEGEN_FORMAT})")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    b = sub.add_parser("build", help="compile specs into OUT/NAME/ (JAX, Numba, DERIVATION.md); OUT: --out, else ./generated")
    b.add_argument("specs", nargs="+", metavar="SPEC", help="spec files (YAML)")
    b.add_argument("--out", default=DEFAULT_OUT,
                   help=f"output folder (default: {DEFAULT_OUT} in the current folder)")
    b.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing; exit 1 on drift")
    b.add_argument("--force", action="store_true",
                   help="overwrite NAME/ folders that another spec file generated (refused otherwise)")
    b.set_defaults(func=_build)
    li = sub.add_parser("list", help="list specs with their parameters, inputs and forms")
    li.add_argument("spec_dir", nargs="?", default="specs", help="folder of specs (default: specs)")
    li.set_defaults(func=_list)
    d = sub.add_parser("derive", help="print the derivation of a spec (Markdown with LaTeX)")
    d.add_argument("spec", help="spec file (YAML)")
    d.set_defaults(func=_derive)
    # Imports only the standard library and mesagen.errors: an ImportError here is a bug and must surface.
    # Missing third-party runtime packages are reported by the train / eval handlers with what to install.
    from mesagen.runtime.cli_train import add_subparsers

    add_subparsers(sub)
    r = sub.add_parser("reproduce", help="run the paper's experiments and write PAPER_RESULTS.md (docs/paper.md)")
    r.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run, numbers not meaningful")
    r.add_argument("--only", metavar="CLAIM", help="one claim: 1 ... 9 or family (the other rows: not run)")
    r.add_argument("--out", default="paper_results", help="output folder (default: paper_results)")
    r.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train the runs in N worker processes side by side first, one core each (default: 1)")
    r.set_defaults(func=_reproduce)
    return ap


def _reproduce(args: argparse.Namespace) -> int:
    from mesagen.runtime.reproduce import reproduce

    try:
        reproduce(args.out, quick=args.quick, only=args.only, jobs=args.jobs)
    except ValueError as exc:
        raise MesagenError(str(exc)) from None
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mesagen`` console script; returns the exit status."""
    args = parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MesagenError as exc:
        for line in str(exc).splitlines() or [""]:  # a spec with several problems: one line each
            print(f"mesagen: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
