"""What ``compress`` is asked to do: :class:`CompressOptions`, and the checks that need no net."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from lrprune_caffe.engines.runtime import ENGINES
from lrprune_caffe.errors import UserError
from lrprune_caffe.lowrank import decompose as dec, rank as rk
from lrprune_caffe.transforms.factorize import format_ranks
from lrprune_caffe.transforms.prune import PruneSpec, _fraction, parse_layer_list, parse_prune_arg

SCHEMES = dec.SCHEMES
PRUNE_METHODS = ("magnitude", "std", "sparsegpt")  # sparsegpt: needs calibration data
GATE_OPTIONS = ("max_drop", "min_agree", "max_rel_l2")
RANK_METHODS = ("svd", "vbmf")
SVD_METHODS = dec.METHODS
DEFAULT_OPSET = 13  # with onnx: the pinned ONNX opset (export.onnx.DEFAULT_OPSET)


@dataclass
class CompressOptions:
    """Every option of ``compress`` (the CLI flags, dashes -> underscores)."""

    # factorization
    scheme: str = "channel"
    rank: object = None  # int, "16", "conv2=16,ip1=64", "8x16" (tucker2: r_in x r_out)
    energy: float = None
    speedup: float = None
    rank_method: str = "svd"
    criterion: str = "log-energy"  # --speedup: rk.CRITERIA
    layers: object = None  # "conv2,ip.*" or a list of names / regexes
    svd: str = "auto"
    hooi: int = 0
    seed: int = 0
    # pruning (after factorization)
    prune: object = None  # "0.5" / "conv1=0.3,ip1=0.9" / a float
    prune_scope: str = None
    prune_method: str = None
    quality: float = None
    prune_structured: bool = False
    prune_exclude: object = None  # "a,b" or a list
    # outputs and checks
    onnx: bool = False
    sparse: bool = False
    opset: int = DEFAULT_OPSET
    precision: str = None  # with onnx: "fp16" (export.precision); None / "fp32": as exported
    quantize: str = None  # with onnx: "int8" static QDQ, calibrated on CompressData.calib
    # calibration (CompressData.calib: unlabeled inputs): data-aware ranks, fits and masks
    calib_n: int = 512  # how many calibration samples the file wrapper reads
    calib_damping: float = 0.01  # ridge damping relative to mean(diag H) of every fit
    calib_fit: bool = True  # False: use the calibration data for the check / int8 only
    # quality gate (compress fails, exit 1, no model files, when the check shows worse)
    max_drop: float = None  # top-1 points (with labels) the compressed net may lose
    min_agree: float = None  # least top-1 agreement with the original, 0..1
    max_rel_l2: float = None  # largest relative L2 error of any output
    verify: bool = True
    engine: str = "onnxruntime"  # the check's engine, and with --speedup the target runtime
    threads: int = None
    # --speedup's target (core/latency_cost.py)
    cost: str = None  # "latency" | "macs" | None: latency when its tables can be had in table_time
    batch: int = None  # the target's batch (None: 1)
    table_time: float = None  # seconds the latency tables may take (None: 60, or no limit with cost latency)
    measure_rounds: int = None  # interleaved rounds of the measured speed-up (None: 20; 0: not measured)
    progress: bool = False

    @classmethod
    def from_kwargs(cls, **kw) -> "CompressOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kw) - known)
        if unknown:
            raise UserError(f"compress: unknown option(s) {', '.join(unknown)}")
        return cls(**kw)

    @property
    def factorizing(self) -> bool:
        return (self.rank is not None or self.energy is not None or self.speedup is not None
                or self.rank_method == "vbmf")

    def as_report(self) -> dict:
        """The options as report.json records them."""
        out = {"scheme": self.scheme, "rank": None if self.rank is None else str(self.rank),
               "energy": self.energy, "speedup": self.speedup, "rank_method": self.rank_method,
               "layers": self.layers, "svd": self.svd, "hooi": self.hooi, "seed": self.seed}
        for name in ("prune", "prune_scope", "prune_method", "quality", "prune_structured", "prune_exclude",
                     "sparse"):
            out[name] = getattr(self, name)
        if self.precision not in (None, "fp32") or self.quantize is not None:
            out.update(precision=self.precision, quantize=self.quantize)
        gate = {k: getattr(self, k) for k in GATE_OPTIONS if getattr(self, k) is not None}
        if gate:
            out["gate"] = gate
        if self.speedup is not None:
            out.update(cost=self.cost, engine=self.engine, threads=self.threads, batch=self.batch)
        return out


def _as_list(spec) -> list:
    if spec is None:
        return []
    if isinstance(spec, (list, tuple)):
        items = []
        for s in spec:
            items.extend(_as_list(s))
        return items
    return [s.strip() for s in str(spec).split(",") if s.strip()]


def _parse_one_rank(text: str, what: str) -> tuple:
    t = text.strip().lower()
    parts = t.split("x") if "x" in t else [t]
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError:
        raise UserError(f"--rank: '{what}' is not a rank (expected R, R1xR2 for tucker2, or LAYER=R)") from None
    if len(vals) not in (1, 2):
        raise UserError(f"--rank: '{what}' is not a rank (expected R, R1xR2 for tucker2, or LAYER=R)")
    for v in vals:
        if v < 1:
            raise UserError(f"--rank: rank {text} must be at least 1")
    return vals


def parse_rank_spec(spec):
    """(default ranks or None, {layer: ranks}) from ``16`` / ``conv2=16,ip1=64`` / ``8x16``."""
    if spec is None:
        return None, {}
    if isinstance(spec, (int, np.integer)):
        if spec < 1:
            raise UserError(f"--rank: rank {spec} must be at least 1")
        return (int(spec),), {}
    default, per = None, {}
    for item in _as_list(spec):
        if "=" in item:
            name, r = item.rsplit("=", 1)
            name = name.strip()
            if not name:
                raise UserError(f"--rank: '{item}' has no layer name before '='")
            per[name] = _parse_one_rank(r, item)
        else:
            if default is not None:
                raise UserError(f"--rank: two default ranks ('{format_ranks(default)}' and '{item}')")
            default = _parse_one_rank(item, item)
    if default is None and not per:
        raise UserError("--rank: no rank given")
    return default, per


def default_scope(o: CompressOptions, method: str) -> str:
    """The pruning scope without --prune-scope: ``erk`` (the fraction over the net, small layers and layers
    with few weights per output kept denser, :func:`lrprune_caffe.transforms.prune.erk_fractions`) for
    unstructured magnitude pruning, else ``layer``. Issue 10: ``--speedup 3 --prune 0.9`` without data left
    conv2_lr2 (50 x 7) with 35 weights for its 50 outputs and conv1 with 2.5 per filter at ``layer``: 18.4%
    top-1, 92.7% after 3 epochs of the then default fine-tuning; ``erk`` keeps conv2_lr2 and ip2 dense (90.0% of the
    net's weights still zero): 57.6% data-free, 96.3% after finetune's defaults (mean of 3 seeds,
    examples/lenet/FINETUNE.md)."""
    return "erk" if method == "magnitude" and not o.prune_structured else "layer"


def prune_spec(o: CompressOptions):
    """A PruneSpec from the pruning options, or None when no pruning is asked for."""
    method = o.prune_method or "magnitude"
    if method not in PRUNE_METHODS:
        raise UserError(f"--prune-method: unknown method '{method}' (choose from {', '.join(PRUNE_METHODS)})")
    if method == "sparsegpt":
        if o.prune_structured:
            raise UserError("--prune-method sparsegpt chooses single weights: it cannot be combined with "
                            "--prune-structured")
        method = "magnitude"  # the starting masks; calibrate_pruned re-chooses them by SparseGPT saliency
    if o.prune is None and method != "std":
        for k in ("prune_scope", "prune_structured", "prune_exclude", "quality"):
            if getattr(o, k) not in (None, False, "", ()):
                raise UserError(f"--{k.replace('_', '-')} needs --prune FRACTION (or --prune-method std)")
        return None
    if o.prune is None:
        default, per = None, {}
    elif isinstance(o.prune, (int, float)) and not isinstance(o.prune, bool):
        default, per = _fraction(o.prune, "--prune"), {}
    else:
        default, per = parse_prune_arg(o.prune)
    if method == "std" and (default is not None or any(f > 0 for f in per.values())):
        raise UserError("--prune-method std zeroes |w| < Q x std(W) with Q from --quality: --prune takes no "
                        "fraction with it (leave layers out with LAYER=0 or --prune-exclude)")
    if method != "std" and o.quality is not None:
        raise UserError("--quality is the Q of --prune-method std (|w| < Q x std(W)); magnitude pruning "
                        "takes the fraction from --prune: drop --quality or add --prune-method std")
    if method != "std" and not default and not any(f > 0 for f in per.values()):
        raise UserError(f"--prune {o.prune}: every fraction is 0, so nothing would be pruned")
    exclude = o.prune_exclude or ()
    exclude = parse_layer_list(exclude) if isinstance(exclude, str) else tuple(exclude)
    return PruneSpec(fraction=default, per_layer=per, exclude=exclude, scope=o.prune_scope or default_scope(o, method),
                     method=method, quality=None if o.quality is None else float(o.quality),
                     structured=bool(o.prune_structured))


def check_options(o: CompressOptions):
    """Options that are wrong whatever the net holds (UserError). Returns the PruneSpec (or None)."""
    spec = prune_spec(o)  # also checks the pruning flags
    if o.scheme not in SCHEMES:
        raise UserError(f"--scheme: unknown scheme '{o.scheme}' (choose from {', '.join(SCHEMES)})")
    if o.rank_method not in RANK_METHODS:
        raise UserError(f"--rank-method: unknown method '{o.rank_method}' (choose from {', '.join(RANK_METHODS)})")
    if o.svd not in SVD_METHODS:
        raise UserError(f"--svd: unknown SVD method '{o.svd}' (choose from {', '.join(SVD_METHODS)})")
    if o.engine not in ENGINES:
        raise UserError(f"--engine: unknown engine '{o.engine}' (choose from {', '.join(ENGINES)})")
    chosen = [n for n, v in (("--rank", o.rank), ("--energy", o.energy), ("--speedup", o.speedup)) if v is not None]
    if o.rank_method == "vbmf":
        if chosen:
            raise UserError(f"--rank-method vbmf chooses the ranks itself; drop {chosen[0]}")
    elif not chosen:
        if spec is None:
            raise UserError("say what to do: choose ranks (--rank R, --energy E, --speedup S or --rank-method "
                            "vbmf), or prune (--prune F, --prune-method std --quality Q), or both")
    elif len(chosen) > 1:
        raise UserError(f"choose one of {' / '.join(chosen)}")
    if o.energy is not None and not 0 < float(o.energy) <= 1:
        raise UserError(f"--energy {o.energy} must be in (0, 1] (the share of squared singular values kept)")
    if o.speedup is not None and not float(o.speedup) > 1:
        raise UserError(f"--speedup {o.speedup} cannot be reached: it must be above 1 (a MAC reduction factor)")
    if o.hooi is not None and int(o.hooi) < 0:
        raise UserError(f"--hooi {o.hooi} must be >= 0")
    if o.hooi and o.scheme != "tucker2":
        raise UserError(f"--hooi refines Tucker-2 factors; it has no effect with --scheme {o.scheme}: "
                        f"drop it or use --scheme tucker2")
    if o.criterion not in rk.CRITERIA:
        raise UserError(f"unknown budget criterion '{o.criterion}' (choose from {', '.join(rk.CRITERIA)})")
    if o.svd == "randomized" and o.rank is None:
        raise UserError("--svd randomized needs fixed ranks (--rank): the other rank rules need every "
                        "singular value")
    if o.sparse and not o.onnx:
        raise UserError("--sparse writes sparse ONNX initializers: it needs --onnx")
    if o.onnx:
        try:
            from lrprune_caffe.export.onnx import check_opset
        except ImportError as e:
            raise UserError(f"--onnx needs the ONNX exporter (lrprune_caffe.export.onnx): {e}") from None
        check_opset(int(o.opset))  # fail before the work, not after
        from lrprune_caffe.export.precision import check_options as check_precision
        check_precision(o.precision, o.quantize)
    elif o.opset != DEFAULT_OPSET:
        raise UserError("--opset applies to the ONNX file: add --onnx")
    elif o.precision not in (None, "fp32") or o.quantize is not None:
        raise UserError(f"--{'quantize' if o.quantize else 'precision'} converts model.onnx: add --onnx")
    if int(o.calib_n) < 1:
        raise UserError(f"--calib-n {o.calib_n} must be at least 1")
    if not 0 <= float(o.calib_damping) < 1e6:
        raise UserError(f"--calib-damping {o.calib_damping} must be >= 0")
    if o.min_agree is not None and not 0 <= float(o.min_agree) <= 1:
        raise UserError(f"--min-agree {o.min_agree} must be in [0, 1] (a share of samples, e.g. 0.95)")
    if o.max_rel_l2 is not None and not float(o.max_rel_l2) >= 0:
        raise UserError(f"--max-rel-l2 {o.max_rel_l2} must be >= 0")
    if o.max_drop is not None and not float(o.max_drop) >= 0:
        raise UserError(f"--max-drop {o.max_drop} must be >= 0 (top-1 percentage points)")
    if not o.verify and any(getattr(o, k) is not None for k in GATE_OPTIONS):
        raise UserError("--max-drop / --min-agree / --max-rel-l2 judge the check: drop --no-verify")
    from .latency_cost import check_options as check_cost
    check_cost(o)
    parse_rank_spec(o.rank)
    return spec


__all__ = ["CompressOptions", "check_options", "PRUNE_METHODS", "GATE_OPTIONS",
           "prune_spec", "parse_rank_spec", "SCHEMES", "RANK_METHODS",
           "SVD_METHODS"]
