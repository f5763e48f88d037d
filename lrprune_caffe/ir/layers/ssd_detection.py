"""DetectionOutput (SSD fork) lowered to ONNX, on NonMaxSuppression.

What the fork's ``DetectionOutputLayer::Forward_cpu`` computes, per image:

1. decode each prior's location prediction (``bbox_util.cpp`` DecodeBBox;
   ``var`` is the prior's variance, or 1 with ``variance_encoded_in_target``):
   CORNER ``prior + var * loc``; CENTER_SIZE centre ``var01 * loc01 * prior_size
   + prior_centre``, size ``exp(var23 * loc23) * prior_size``; CORNER_SIZE
   ``prior + var * loc * prior_size``. One box per prior with ``share_location``,
   else one per prior and class;
2. per class other than ``background_label_id``: the scores above
   ``confidence_threshold`` (strictly; all of them when it is unset), the
   ``top_k`` highest (stable: ties keep prior order), then greedy NMS in score
   order keeping a box when its IoU with every kept box is <= ``nms_threshold``.
   A box with xmax < xmin or ymax < ymin has size 0 and IoU 0 with anything;
3. with ``keep_top_k`` >= 0, the ``keep_top_k`` highest-scoring detections of
   the image over all classes;
4. rows ``[image, label, score, xmin, ymin, xmax, ymax]``, by image, then label,
   then score (descending) within a label, as a 1x1xDx7 blob; when no image has
   any detection, one row ``[i, -1, -1, -1, -1, -1, -1]`` per image.

The graph: decode as tensors; TopK (k = top_k) per image and class; each
(image, class) pair becomes one NMS batch entry (classes moved into the batch,
so each class keeps its own top_k candidates); the kept candidates' scores are
scattered into an (image, class * candidate) grid that is -inf elsewhere;
TopK (k = keep_top_k) per image row; NonZero on the grid lists the survivors
in row-major order, which is the fork's order (candidates are score-sorted
within a class). ONNX NonMaxSuppression suppresses at IoU > threshold and
keeps scores > score_threshold, as the fork does; boxes with negative extent
are given zero area before NMS so that it cannot reorder their corners.

Not lowered (NoLowering): NMS ``eta`` < 1 (Caffe's adaptive threshold has no
ONNX form), ``top_k`` 0, no class besides the background.
"""

from __future__ import annotations

import numpy as np

from .base import NoLowering, ShapeError, prod

# PriorBoxParameter.CodeType
CORNER, CENTER_SIZE, CORNER_SIZE = 1, 2, 3


def _reduce(ctx, op, x, axes, suffix):
    """Reduce* keeping dims; axes an input from opset 13 (ReduceSum) / 18 (the others)."""
    if ctx.opset >= (13 if op == "ReduceSum" else 18):
        return ctx.node(op, [x, ctx.ints(f"{suffix}_axes", axes)], suffix=suffix, keepdims=1)
    return ctx.node(op, [x], suffix=suffix, axes=list(axes), keepdims=1)


def _unsqueeze(ctx, x, axes, suffix):
    if ctx.opset >= 13:
        return ctx.node("Unsqueeze", [x, ctx.ints(f"{suffix}_axes", axes)], suffix=suffix)
    return ctx.node("Unsqueeze", [x], suffix=suffix, axes=list(axes))


def _slice(ctx, x, start, end, axis, suffix):
    return ctx.node("Slice", [x, ctx.ints(f"{suffix}_starts", [start]), ctx.ints(f"{suffix}_ends", [end]),
                              ctx.ints(f"{suffix}_axes", [axis])], suffix=suffix)


def _row(ctx, x, i, shape, suffix):
    """x[i] along axis 0, reshaped to ``shape``."""
    return ctx.node("Reshape", [_slice(ctx, x, i, i + 1, 0, f"{suffix}_slice"), ctx.ints(f"{suffix}_shape", shape)],
                    suffix=suffix)


def _full_like(ctx, x, value, suffix):
    from onnx import TensorProto, helper
    shape = ctx.node("Shape", [x], suffix=f"{suffix}_shape")
    return ctx.node("ConstantOfShape", [shape], suffix=suffix,
                    value=helper.make_tensor("value", TensorProto.FLOAT, [1], [value]))


def _params(layer, ctx):
    p = layer.param_msg("detection_output_param")
    if ctx.n_bottoms < 3:
        raise ShapeError(f"needs 3 bottoms (loc, conf, priors), got {ctx.n_bottoms}")
    n_classes = int(p.num_classes)
    if n_classes < 1:
        raise ShapeError("num_classes must be set")
    nms = p.nms_param
    if float(nms.eta) < 1.0:
        raise NoLowering(f"nms_param.eta {nms.eta} < 1 (Caffe's adaptive NMS threshold) has no ONNX form")
    top_k = int(nms.top_k) if nms.HasField("top_k") else -1
    if top_k == 0:
        raise NoLowering("nms_param.top_k 0 keeps no box")
    bg = int(p.background_label_id)
    classes = [c for c in range(n_classes) if c != bg]
    if not classes:
        raise NoLowering(f"no class besides the background ({bg}) of {n_classes}")
    code = int(p.code_type)
    if code not in (CORNER, CENTER_SIZE, CORNER_SIZE):
        raise ShapeError(f"unknown code_type {code}")
    return p, n_classes, classes, top_k, code


def lower_detection_output(layer, ctx):
    p, n_classes, classes, top_k, code = _params(layer, ctx)
    share = bool(p.share_location)
    venc = bool(p.variance_encoded_in_target)
    n_loc = 1 if share else n_classes
    loc_s, conf_s, prior_s = ctx.in_shapes[:3]
    n, n2 = int(loc_s[0]), int(ctx.in_shapes2[0][0])
    if len(prior_s) < 3:
        raise ShapeError(f"priors must be (1, 2, 4 * priors), got {tuple(prior_s)}")
    n_priors = int(prior_s[2]) // 4  # the fork: bottom[2]->height() / 4
    if prod(loc_s[1:]) != n_priors * n_loc * 4:
        raise ShapeError(f"loc has {prod(loc_s[1:])} values per image, want {n_priors} priors x "
                         f"{n_loc} x 4")
    if prod(conf_s[1:]) != n_priors * n_classes or int(conf_s[0]) != n:
        raise ShapeError(f"conf has {prod(conf_s[1:])} values per image, want {n_priors} priors x "
                         f"{n_classes} classes")
    per = prod(prior_s) // (n_priors * 4)
    if prior_s != ctx.in_shapes2[2] or per < (1 if venc else 2) or prod(prior_s) % (n_priors * 4):
        raise ShapeError(f"priors {tuple(prior_s)} must hold the boxes"
                         + ("" if venc else " and their variances") + f" of {n_priors} priors, "
                         "the same for every batch size")
    k = n_priors if top_k < 0 or top_k >= n_priors else top_k
    nc = len(classes)

    # ---- 1. decode: boxes (N, n_loc, P, 4) --------------------------------------------------
    priors = ctx.node("Reshape", [ctx.bottom(2), ctx.ints("priors_shape", [per, n_priors, 4])],
                      suffix="priors")
    pbox = _row(ctx, priors, 0, [n_priors, 4], "prior_boxes")
    if n_loc > 1:
        loc = ctx.reshape(ctx.bottom(0), (n, n_priors, n_loc, 4), (n2, n_priors, n_loc, 4), suffix="loc")
        loc = ctx.node("Transpose", [loc], suffix="loc_by_class", perm=[0, 2, 1, 3])
    else:  # (P, 1, 4) per image is (1, P, 4)
        loc = ctx.reshape(ctx.bottom(0), (n, 1, n_priors, 4), (n2, 1, n_priors, 4), suffix="loc")
    if not venc:
        pvar = _row(ctx, priors, 1, [n_priors, 4], "prior_variances")
        loc = ctx.node("Mul", [loc, pvar], suffix="loc_scaled")
    if code == CORNER:
        boxes = ctx.node("Add", [pbox, loc], suffix="decoded")
    else:
        pmin = _slice(ctx, pbox, 0, 2, 1, "prior_min")
        pmax = _slice(ctx, pbox, 2, 4, 1, "prior_max")
        psize = ctx.node("Sub", [pmax, pmin], suffix="prior_size")
        if code == CORNER_SIZE:
            psize4 = ctx.node("Concat", [psize, psize], suffix="prior_size4", axis=1)
            boxes = ctx.node("Add", [pbox, ctx.node("Mul", [loc, psize4], suffix="offsets")], suffix="decoded")
        else:
            half = ctx.scalar("half", 0.5)
            pcenter = ctx.node("Mul", [ctx.node("Add", [pmin, pmax], suffix="prior_sum"), half],
                               suffix="prior_center")
            center = ctx.node("Add", [ctx.node("Mul", [_slice(ctx, loc, 0, 2, 3, "loc_center"), psize],
                                               suffix="center_offset"), pcenter], suffix="center")
            size = ctx.node("Mul", [ctx.node("Exp", [_slice(ctx, loc, 2, 4, 3, "loc_size")],
                                             suffix="size_factor"), psize], suffix="size")
            hs = ctx.node("Mul", [size, half], suffix="half_size")
            boxes = ctx.node("Concat", [ctx.node("Sub", [center, hs], suffix="box_min"),
                                        ctx.node("Add", [center, hs], suffix="box_max")],
                             suffix="decoded", axis=3)

    # ---- 2. per class: top_k candidates, then NMS -------------------------------------------
    conf = ctx.reshape(ctx.bottom(1), (n, n_priors, n_classes), (n2, n_priors, n_classes), suffix="conf")
    conf = ctx.node("Transpose", [conf], suffix="conf_by_class", perm=[0, 2, 1])  # (N, C, P)
    cls_idx = ctx.ints("classes", classes)
    if nc != n_classes:
        conf = ctx.node("Gather", [conf, cls_idx], suffix="conf_classes", axis=1)
    if share:
        boxes = ctx.node("Tile", [boxes, ctx.ints("tile_classes", [1, nc, 1, 1])], suffix="boxes_per_class")
    elif nc != n_classes:
        boxes = ctx.node("Gather", [boxes, cls_idx], suffix="boxes_classes", axis=1)
    scores, idx = ctx.node("TopK", [conf, ctx.ints("top_k", [k])], suffix="top_k", n_out=2,
                           axis=2, largest=1, sorted=1)  # (N, C', K), ties: lower prior first
    idx4 = ctx.node("Tile", [_unsqueeze(ctx, idx, [3], "idx_col"), ctx.ints("tile_coords", [1, 1, 1, 4])],
                    suffix="idx4")
    cand = ctx.node("GatherElements", [boxes, idx4], suffix="candidates", axis=2)  # (N, C', K, 4)
    cmin = _slice(ctx, cand, 0, 2, 3, "cand_min")
    extent = _reduce(ctx, "ReduceMin", ctx.node("Sub", [_slice(ctx, cand, 2, 4, 3, "cand_max"), cmin],
                                                 suffix="extent"), [3], "min_extent")
    invalid = ctx.node("Less", [extent, ctx.scalar("zero", 0.0)], suffix="inverted")
    nms_boxes = ctx.node("Where", [invalid, ctx.node("Concat", [cmin, cmin], suffix="point", axis=3), cand],
                         suffix="nms_boxes")
    nb = ctx.reshape(nms_boxes, (n * nc, k, 4), (n2 * nc, k, 4), suffix="nms_in_boxes")
    ns = ctx.reshape(scores, (n * nc, 1, k), (n2 * nc, 1, k), suffix="nms_in_scores")
    keep = int(p.keep_top_k)
    max_out = k if keep < 0 else min(k, keep)
    nms_in = [nb, ns, ctx.ints("max_per_class", [max_out]),
              ctx.const("iou_threshold", np.asarray([p.nms_param.nms_threshold], np.float32))]
    if p.HasField("confidence_threshold"):
        nms_in.append(ctx.const("score_threshold", np.asarray([p.confidence_threshold], np.float32)))
    sel = ctx.node("NonMaxSuppression", nms_in, suffix="nms", center_point_box=0)  # (M, 3)
    pairs = ctx.node("Gather", [sel, ctx.ints("batch_and_box", [0, 2])], suffix="kept_pairs", axis=1)
    flat_scores = ctx.reshape(scores, (n * nc, k), (n2 * nc, k), suffix="scores_2d")
    kept = ctx.node("ScatterND", [_full_like(ctx, flat_scores, -np.inf, "no_scores"), pairs,
                                  ctx.node("GatherND", [flat_scores, pairs], suffix="kept_scores")],
                    suffix="kept_grid")
    grid = ctx.reshape(kept, (n, nc * k), (n2, nc * k), suffix="grid")  # (N, C' * K)

    # ---- 3. keep_top_k per image ---------------------------------------------------------
    if 0 <= keep < nc * k:
        tv, ti = ctx.node("TopK", [grid, ctx.ints("keep_top_k", [keep])], suffix="keep_top_k", n_out=2,
                          axis=1, largest=1, sorted=1)
        grid = ctx.node("ScatterElements", [_full_like(ctx, grid, -np.inf, "no_kept"), ti, tv],
                        suffix="kept_top", axis=1)

    # ---- 4. rows in the fork's order -------------------------------------------------------
    mask = ctx.node("Greater", [grid, ctx.scalar("neg_inf", -np.inf)], suffix="kept_mask")
    nz = ctx.node("NonZero", [mask], suffix="survivors")  # (2, D): image, class * K + candidate
    where = ctx.node("Transpose", [nz], suffix="survivor_pairs", perm=[1, 0])  # (D, 2)
    score = ctx.node("GatherND", [grid, where], suffix="score")
    image = _row(ctx, nz, 0, [-1], "image_index")
    column = _row(ctx, nz, 1, [-1], "column")
    cls_pos = ctx.node("Div", [column, ctx.ints("k", [k])], suffix="class_pos")
    label = ctx.node("Gather", [ctx.const("labels", np.asarray(classes, np.float32)), cls_pos], suffix="label",
                     axis=0)
    box = ctx.node("GatherND", [ctx.reshape(cand, (n, nc * k, 4), (n2, nc * k, 4), suffix="cand_flat"), where],
                   suffix="box")
    cols = [_unsqueeze(ctx, ctx.node("Cast", [image], suffix="image_f", to=1), [1], "image_col"),
            _unsqueeze(ctx, label, [1], "label_col"), _unsqueeze(ctx, score, [1], "score_col"), box]
    rows = ctx.node("Concat", cols, suffix="rows", axis=1)  # (D, 7)
    _emit(ctx, rows, n)


def _emit(ctx, rows, n):
    """Top: rows as 1x1xDx7, or the fork's per-image [i, -1 x 6] rows when D == 0."""
    if ctx.dynamic_batch:
        shape = ctx.node("Shape", [ctx.bottom(1)], suffix="conf_shape")
        n_1d = _slice(ctx, shape, 0, 1, 0, "batch_1d")
        scalar = ctx.ints("scalar_shape", [])
        ids = ctx.node("Range", [ctx.node("Reshape", [ctx.ints("r0", [0]), scalar], suffix="range_start"),
                                 ctx.node("Reshape", [n_1d, scalar], suffix="batch"),
                                 ctx.node("Reshape", [ctx.ints("r1", [1]), scalar], suffix="range_step")],
                       suffix="image_ids")
        ids = _unsqueeze(ctx, ctx.node("Cast", [ids], suffix="image_ids_f", to=1), [1], "image_ids_col")
        minus = ctx.node("Expand", [ctx.const("minus_ones", -np.ones((1, 6), np.float32)),
                                    ctx.node("Concat", [n_1d, ctx.ints("six", [6])], suffix="fake_shape",
                                             axis=0)], suffix="fake_values")
        fake = ctx.node("Concat", [ids, minus], suffix="fake_rows", axis=1)
    else:
        f = -np.ones((n, 7), np.float32)
        f[:, 0] = np.arange(n)
        fake = ctx.const("fake_rows", f)
        n_1d = ctx.ints("batch_1d", [n])
    count = _slice(ctx, ctx.node("Shape", [rows], suffix="rows_shape"), 0, 1, 0, "count")
    end = ctx.node("Where", [ctx.node("Greater", [count, ctx.ints("zero_i", [0])], suffix="any"), count, n_1d],
                   suffix="end")
    both = ctx.node("Concat", [rows, fake], suffix="rows_or_fake", axis=0)
    out = ctx.node("Slice", [both, ctx.ints("out_starts", [0]), end, ctx.ints("out_axes", [0])],
                   suffix="selected")
    ctx.node("Reshape", [out, ctx.ints("out_shape", [1, 1, -1, 7])], ctx.top(0))
    ctx.set_top_dims(0, [1, 1, None, 7])
