"""What every sub-command module shares: exit statuses, argument helpers, table printing.

The sub-command modules (:mod:`.compress`, :mod:`.export`, :mod:`.train`) import this,
never :mod:`.main`; :mod:`.main` imports them.
"""

from __future__ import annotations

import argparse
import sys

#: exit statuses (README, "Exit statuses")
EXIT_OK = 0
EXIT_CHECK_FAILED = 1  # verify --max-rel-l2, a quality gate
EXIT_BAD_INPUT = 2  # bad file, impossible request, usage error (also with --debug)
EXIT_INTERNAL = 3  # a bug of ours: one line, --debug shows the traceback


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


class _DeprecatedOutdir(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: note: {option_string} is deprecated; use -o/--output", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_output(p, kind: str, metavar: str, help: str):
    """``-o/--output`` (the output path of every command; ``--outdir`` a hidden deprecated
    alias) and ``--force``. ``kind`` is "dir" (a folder the run fills, all or nothing) or
    "file"; the CLI checks it before any work (:mod:`lrprune_caffe.fileutil`)."""
    p.add_argument("-o", "--output", metavar=metavar, default=None, help=help + " (required)")
    p.add_argument("--outdir", dest="output", action=_DeprecatedOutdir, help=argparse.SUPPRESS)
    what = "file" if kind == "file" else "non-empty folder (its old files go; it then holds only this run's)"
    p.add_argument("--force", action="store_true", help=f"replace an existing output {what}")
    p.set_defaults(output_kind=kind)

