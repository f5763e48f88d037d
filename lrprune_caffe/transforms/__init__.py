"""Named graph passes over the IR.

A pass is a function ``fn(net, **options) -> PassResult`` registered with
:func:`graph_pass`. Its docstring is its header: **before**, **after**,
**preconditions**, **formula**. Conventions, as in onnxoptimizer:

* a pass checks its preconditions *before* it changes anything; when one
  fails it raises :class:`Precondition` and the net is left untouched; the
  runner turns that into a ``PassResult(changed=False, reason=...)``;
* the runner re-validates the net (:func:`lrprune_caffe.ir.analysis.validate`)
  after every pass that changed it, so a broken rewrite is caught at once,
  as an internal error (not the user's fault).
"""

from __future__ import annotations

from dataclasses import dataclass, field

PASSES: dict = {}


class Precondition(Exception):
    """A pass cannot apply; the message says why. The net is untouched."""


@dataclass
class PassResult:
    name: str
    changed: bool = False
    reason: str = ""  # why nothing changed (precondition), if so
    details: list = field(default_factory=list)  # per-layer records for reports


def graph_pass(name: str):
    def deco(fn):
        PASSES[name] = fn
        fn.pass_name = name
        return fn
    return deco


def run_pass(name_or_fn, net, **options) -> PassResult:
    """Run one pass; validate the net afterwards if it changed."""
    from lrprune_caffe.ir.analysis import validate
    fn = PASSES[name_or_fn] if isinstance(name_or_fn, str) else name_or_fn
    pname = getattr(fn, "pass_name", fn.__name__)
    try:
        result = fn(net, **options)
    except Precondition as e:
        return PassResult(pname, changed=False, reason=str(e))
    if result is None:
        result = PassResult(pname, changed=True)
    if result.changed:
        try:
            validate(net)
        except Exception as e:  # a pass that breaks the graph is our bug
            raise RuntimeError(f"internal error: pass '{pname}' left an invalid net: {e}") from e
    return result
