"""``lrprune-caffe`` command line. Parses arguments, calls :mod:`lrprune_caffe.api`, prints.

Errors that are the user's or the file's (:class:`LrpruneError`) print one
line on stderr and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from lrprune_caffe.version import __version__
from lrprune_caffe.errors import LrpruneError

EXIT_BAD_INPUT = 2


def _fmt_int(n) -> str:
    if n >= 10**9:
        return f"{n / 1e9:.2f}G"
    if n >= 10**6:
        return f"{n / 1e6:.2f}M"
    if n >= 10**4:
        return f"{n / 1e3:.1f}K"
    return str(n)


def print_table(headers, rows, file=None):
    file = file or sys.stdout
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    right = [i for i, h in enumerate(headers) if h.lower() in {"params", "macs", "params_after",
                                                                "macs_after", "rank", "nonzero"}]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    print(line(headers), file=file)
    print(line(["-" * w for w in widths]), file=file)
    for r in rows:
        print(line(r), file=file)


def _shape_str(shapes) -> str:
    return ", ".join("?" if s is None else "x".join(map(str, s)) for s in shapes)


# ---- commands ---------------------------------------------------------------

def cmd_inspect(args):
    from lrprune_caffe.api import inspect_net
    info = inspect_net(args.net, args.weights, phase=args.phase, stages=tuple(args.stage), level=args.level)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [(r["name"], r["type"], f"{','.join(r['bottoms'])} -> {','.join(r['tops'])}",
             _shape_str(r["output_shapes"]), _fmt_int(r["params"]), _fmt_int(r["macs"]))
            for r in info["layers"]]
    print(f"net: {info['net'] or '(unnamed)'}   inputs: "
          + (", ".join(f"{k} {_shape_str([v])}" for k, v in info["inputs"].items()) or "(none)"))
    print_table(["name", "type", "bottoms -> tops", "output shape", "params", "MACs"], rows)
    t = info["totals"]
    print(f"total: {t['params']:,} params, {t['macs']:,} MACs")
    for note in info["notes"]:
        print(f"note: {note}", file=sys.stderr)
    return 0


def cmd_convert(args):
    from lrprune_caffe.api import convert
    if args.all_phases and (args.stage or args.level):
        from lrprune_caffe.errors import UserError
        raise UserError("--all-phases keeps every rule; --stage / --level choose one view: give one or the other")
    res = convert(args.net, args.weights, args.output, phase=args.phase, all_phases=args.all_phases,
                  stages=tuple(args.stage), level=args.level)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for kind, path in res["written"].items():
            print(f"wrote {path}")
        for note in res["notes"]:
            print(f"note: {note}", file=sys.stderr)
    return 0


def _add_net_args(p, weights_required=False):
    p.add_argument("net", metavar="NET.prototxt", help="deploy (or train/test) net definition")
    if weights_required:
        p.add_argument("weights", metavar="WEIGHTS.caffemodel", help="trained weights")
    else:
        p.add_argument("weights", metavar="WEIGHTS.caffemodel", nargs="?", default=None,
                       help="trained weights (optional)")
    p.add_argument("--phase", choices=["TEST", "TRAIN"], default="TEST",
                   help="which view of a net with phase rules to use (default TEST, the deploy view)")


def _add_state_args(p):
    """Caffe's NetState beyond the phase: stages and level, for include/exclude rules."""
    p.add_argument("--stage", action="append", default=[], metavar="NAME",
                   help="a NetState stage for include/exclude rules (repeatable)")
    p.add_argument("--level", type=int, default=0, help="the NetState level for min_level/max_level rules")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lrprune-caffe",
        description="Make legacy Caffe models smaller and faster: low-rank factorization, "
                    "pruning, fine-tuning, Caffe and ONNX output. No Caffe install needed.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("inspect", help="per-layer table: shapes, params, MACs")
    _add_net_args(p)
    _add_state_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="upgrade to the current Caffe format (V1, input headers, phases)")
    _add_net_args(p)
    _add_state_args(p)
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                   help="folder for model.prototxt (and model.caffemodel)")
    p.add_argument("--all-phases", action="store_true",
                   help="keep every layer with its phase rules (a train_val net, as Caffe's "
                        "upgrade_net_proto_text does) instead of writing the --phase view")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(func=cmd_convert)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


#: other modules add their sub-commands here: callables taking the subparsers object
_EXTRA_COMMANDS: list = []


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is ONE line (with where to find the usage), exit 2."""

    def error(self, message):
        print(f"{self.prog}: error: {' '.join(str(message).split())} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _load_extra_commands():
    import importlib
    for mod in ("lrprune_caffe.cli.compress", "lrprune_caffe.cli.export", "lrprune_caffe.cli.train"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        if m.register not in _EXTRA_COMMANDS:  # main() may run many times in one process
            _EXTRA_COMMANDS.append(m.register)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    _load_extra_commands()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, one line printed): a return, in-process too
        return e.code
    try:
        return args.func(args) or 0
    except LrpruneError as e:
        if debug:
            raise
        message = " ".join(str(e).split())  # ONE line, whatever the message holds
        print(f"lrprune-caffe: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("lrprune-caffe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
