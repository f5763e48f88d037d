"""``lrprune-caffe`` command line. Parses arguments, calls :mod:`lrprune_caffe.api`, prints.

Exit statuses (:mod:`.common`): 0 ok; 1 a check failed (``verify --max-rel-l2``);
2 bad input or usage: ONE line on stderr (``--debug`` adds the traceback, the
status stays 2); 3 an internal error: one line and a hint to rerun with ``--debug``.

Every command that writes checks its output before any work: never one of its
inputs, an existing output only with ``--force`` (:mod:`lrprune_caffe.fileutil`).
Python and numpy warnings become ``note:`` lines, never raw.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings

from lrprune_caffe.version import __version__
from lrprune_caffe.errors import LrpruneError, UserError
from . import compress as _compress_cmds, evaluate as _evaluate_cmds, export as _export_cmds, train as _train_cmds
from .common import (EXIT_BAD_INPUT, EXIT_INTERNAL, _add_net_args, _add_state_args, _fmt_int, _shape_str,
                     add_output, print_table)

EXIT_TERMINATED = 143


# ---- commands ---------------------------------------------------------------

def cmd_inspect(args):
    from lrprune_caffe.api import inspect_net
    from lrprune_caffe.io.caffe import nonfinite_policy
    with nonfinite_policy(allow=True):  # inspect shows NaN / Inf weights (a note per layer), never refuses
        info = inspect_net(args.net, args.weights, phase=args.phase, stages=tuple(args.stage), level=args.level)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [(r["name"], r["type"], f"{','.join(r['bottoms'])} -> {','.join(r['tops'])}",
             _shape_str(r["output_shapes"]), "?" if r["params"] is None else _fmt_int(r["params"]),
             "?" if r["macs"] is None else _fmt_int(r["macs"]))
            for r in info["layers"]]
    print(f"net: {info['net'] or '(unnamed)'}   inputs: "
          + (", ".join(f"{k} {_shape_str([v])}" for k, v in info["inputs"].items()) or "(none)"))
    print_table(["name", "type", "bottoms -> tops", "output shape", "params", "MACs"], rows)
    t = info["totals"]
    def total(key, noun):  # unknown: '?', never a sum that passes for a number
        return f"? {noun}" if t[key] is None else f"{t[key]:,} {noun}"
    print(f"total: {total('params', 'params')}, {total('macs', 'MACs')}")
    if not args.quiet:
        for note in info["notes"]:
            print(f"note: {note}", file=sys.stderr)
    return 0


def cmd_convert(args):
    from lrprune_caffe.api import convert
    if args.all_phases and (args.stage or args.level):
        raise UserError("--all-phases keeps every rule; --stage / --level choose one view: give one or the other")
    res = convert(args.net, args.weights, args.output, phase=args.phase, all_phases=args.all_phases,
                  stages=tuple(args.stage), level=args.level)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for kind, path in res["written"].items():
            print(f"wrote {path}")
        if not args.quiet:
            for note in res["notes"]:
                print(f"note: {note}", file=sys.stderr)
    return 0


# ---- parser -------------------------------------------------------------------

#: the sub-command modules, each with register(subparsers); none imports this module
COMMAND_MODULES = (_compress_cmds, _export_cmds, _evaluate_cmds, _train_cmds)


def _add_global_args(p, defaults: bool):
    """--debug / --quiet / --allow-nonfinite, before or after the command name."""
    d = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", default=d(False),
                   help="on an error, also print the traceback (the exit status stays the same)")
    p.add_argument("--quiet", action="store_true", default=d(False),
                   help="no progress bars, per-step lines or notes")
    p.add_argument("--allow-nonfinite", action="store_true", default=d(False),
                   help="go on when weights hold NaN or infinite values (else refused, named per layer)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lrprune-caffe",
        description="Make legacy Caffe models smaller and faster: low-rank factorization, "
                    "pruning, fine-tuning, Caffe and ONNX output. No Caffe install needed.",
        epilog="exit status: 0 ok, 1 a check failed (verify --max-rel-l2), 2 bad input or usage, "
               "3 internal error")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_global_args(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("inspect", help="per-layer table: shapes, params, MACs")
    _add_net_args(p)
    _add_state_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="upgrade to the current Caffe format (V1, input headers, phases)")
    _add_net_args(p)
    _add_state_args(p)
    add_output(p, "dir", "OUTDIR", "folder for model.prototxt (and model.caffemodel)")
    p.add_argument("--all-phases", action="store_true",
                   help="keep every layer with its phase rules (a train_val net, as Caffe's "
                        "upgrade_net_proto_text does) instead of writing the --phase view")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(func=cmd_convert)

    for mod in COMMAND_MODULES:
        mod.register(sub)
    for p in sub.choices.values():
        _add_global_args(p, defaults=False)
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is ONE line (with where to find the usage), exit 2."""

    def error(self, message):
        print(f"{self.prog}: error: {' '.join(str(message).split())} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


# ---- running --------------------------------------------------------------------

_NOT_INPUTS = {"output", "output_blob", "func", "command", "output_kind"}


def input_paths(args) -> list:
    """Every existing path among the parsed arguments except the output: the files the command reads."""
    found = []
    for key, value in vars(args).items():
        if key in _NOT_INPUTS:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, (str, os.PathLike)) and str(v) and os.path.exists(v):
                found.append(str(v))
    return found


def _check_output(args):
    from lrprune_caffe.fileutil import check_outdir, check_output_file
    kind = getattr(args, "output_kind", None)
    if kind is None:
        return
    if not args.output:
        raise _UsageError("the following arguments are required: -o/--output")
    (check_outdir if kind == "dir" else check_output_file)(args.output)


class _UsageError(Exception):
    pass


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _internal_message(e: BaseException):
    """(exit status, message) for an exception that is not the user's or the file's."""
    if type(e).__name__ == "VersionError" and "protobuf" in type(e).__module__:
        import google.protobuf
        return EXIT_BAD_INPUT, (f"the installed protobuf {google.protobuf.__version__} does not fit a "
                                f"package built against another release ({_one_line(e)}); "
                                f"reinstall it: pip install -U 'protobuf>=4.21'")
    return EXIT_INTERNAL, (f"internal error: {type(e).__name__}: {_one_line(e)} "
                           f"(rerun with --debug for the traceback, and please report it)")


def _print_warnings(caught):
    seen = set()
    for w in caught:
        if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning)):
            continue
        text = f"{w.category.__name__}: {_one_line(w.message)}"
        if text not in seen:
            seen.add(text)
            print(f"lrprune-caffe: note: {text}", file=sys.stderr)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, one line printed): a return, in-process too
        return e.code
    debug = args.debug
    from lrprune_caffe.fileutil import Terminated, output_policy
    caught = []
    try:
        from lrprune_caffe.io.caffe import nonfinite_policy  # the protobuf schema: may refuse the runtime
        with warnings.catch_warnings(record=True) as caught, \
                output_policy(force=getattr(args, "force", False), inputs=input_paths(args)), \
                nonfinite_policy(allow=args.allow_nonfinite):
            warnings.simplefilter("default")
            _check_output(args)
            status = args.func(args) or 0
        if not args.quiet:
            _print_warnings(caught)
        return status
    except _UsageError as e:
        print(f"lrprune-caffe {args.command}: error: {e} (see 'lrprune-caffe {args.command} --help')",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    except LrpruneError as e:
        if debug:
            traceback.print_exc()
        print(f"lrprune-caffe: error: {_one_line(e)}", file=sys.stderr)  # ONE line, whatever it holds
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("lrprune-caffe: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("lrprune-caffe: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug of ours (or a broken install): one line, exit 3
        if debug:
            traceback.print_exc()
        status, message = _internal_message(e)
        print(f"lrprune-caffe: error: {message}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
