"""The latency budget's check of a choice: the net factorized (and structurally pruned) as chosen,
measured against the original on the target the way the report measures it (:class:`Checker`), and
the :class:`PruneSpec` of the structured options bought."""

from __future__ import annotations

import time

from lrprune_caffe.engines import latency as L
from lrprune_caffe.errors import EngineError, UserError
from lrprune_caffe.transforms.factorize import LayerPlan


def prune_spec(net, pruned: dict):
    """The structured :class:`PruneSpec` keeping ``pruned[name]`` outputs of each layer."""
    from lrprune_caffe.ir.layers import get_spec
    from lrprune_caffe.transforms.prune import PruneSpec
    per_layer = {}
    for name, k in pruned.items():
        layer = net.layer(name)
        n = get_spec(layer.type).num_output(layer)
        per_layer[name] = (n - int(k)) / float(n)
    return PruneSpec(per_layer=per_layer, structured=True)


def factorized_net(net, infos, choice: dict, o, caches: dict, pruned=None):
    """``net`` factorized at ``choice`` (and structurally pruned as ``pruned`` says; the SVDs in ``caches``
    are reused and kept for the real factorization), or None when nothing changed."""
    from lrprune_caffe.ir.net import Layer, Net, clone_msg
    from lrprune_caffe.transforms import run_pass
    from lrprune_caffe.transforms.factorize import factorize
    from lrprune_caffe.transforms.prune import prune_net
    plan_ = {n: LayerPlan(infos[n].scheme_for(o.scheme), tuple(int(r) for r in ranks), infos[n])
             for n, ranks in choice.items() if ranks is not None}
    new = Net(net.name, list(net.layers), clone_msg(net.header), net.source, net.weights_source, [])
    changed = False
    if plan_:
        res = run_pass(factorize, new, plan=plan_, method=o.svd, seed=o.seed, hooi_iters=0, caches=caches)
        changed = res.changed
    if pruned:
        originals = {id(layer) for layer in net.layers}
        new.layers = [Layer(x.name, x.type, list(x.bottoms), list(x.tops), clone_msg(x.msg), list(x.blobs))
                      if id(x) in originals else x for x in new.layers]
        try:
            prune_net(new, prune_spec(net, pruned))
            changed = True
        except UserError:
            pass
    return new if changed else None


class Checker:
    """``refine`` of :func:`plan`: the speed-up of the net factorized at a choice over the original,
    measured like the report measures it (:func:`lrprune_caffe.engines.latency_net.checked_speedup`:
    both warmed up alike, interleaved rounds, the median ratio). Not cached: a reading taken under
    other load must not decide a later run. The original's runner is built once."""

    def __init__(self, net, infos, target: L.Target, o, caches: dict, budget_s: float = 3.0):
        self.net, self.infos, self.target, self.o, self.caches, self.budget_s = net, infos, target, o, caches, budget_s
        self.base, self.seconds, self.readings = None, 0.0, []

    def __call__(self, choice, pruned=None):
        t0 = time.perf_counter()
        try:
            new = factorized_net(self.net, self.infos, choice, self.o, self.caches, pruned)
            if new is None:
                return None
            if self.base is None:
                self.base = L.net_runner(self.net, self.target)
            m = L.checked_speedup(self.base, L.net_runner(new, self.target), self.target, budget_s=self.budget_s)
        except EngineError:
            return None
        finally:
            self.seconds += time.perf_counter() - t0
        self.readings.append({k: m.get(k) for k in ("paired_median", "paired_p10", "paired_p90",
                                                     "cpu_paired_median", "rounds")})
        return m["speedup_checked"]


__all__ = ["Checker", "factorized_net", "prune_spec"]
