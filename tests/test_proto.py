"""The shipped Caffe schema: descriptor freshness, golden files, SSD, field numbers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from google.protobuf import descriptor, text_format

from conftest import GOLDEN, ROOT, require_shared

from lrprune_caffe.schema.proto import pb

GOLDEN_DIRS = sorted(p for p in GOLDEN.glob("*") if (p / "model.prototxt").exists()) if GOLDEN.is_dir() else []
CASE_PARAMS = [pytest.param(p, id=p.name) for p in GOLDEN_DIRS] or [pytest.param(None, id="no-golden")]


def corpus_case(case):
    """The case folder; without a corpus (case None) skips, or fails under CI."""
    return require_shared(GOLDEN if case is None else case, "the golden corpus")


def unknown_field_paths(msg, path="") -> list[str]:
    """Paths of every message (recursively) that carries unknown fields."""
    try:
        from google.protobuf.unknown_fields import UnknownFieldSet  # protobuf >= 4.24

        count = len(UnknownFieldSet(msg))
    except ImportError:
        count = len(msg.UnknownFields())
    found = [path or "<root>"] if count else []
    for field, value in msg.ListFields():
        if field.cpp_type != descriptor.FieldDescriptor.CPPTYPE_MESSAGE:
            continue
        if is_repeated(field):
            for i, item in enumerate(value):
                found += unknown_field_paths(item, f"{path}.{field.name}[{i}]")
        else:
            found += unknown_field_paths(value, f"{path}.{field.name}")
    return found


def field(message: str, name: str):
    return getattr(pb, message).DESCRIPTOR.fields_by_name[name]


def is_repeated(fd) -> bool:
    # FieldDescriptor.label is gone in protobuf 7; is_repeated is new in 5.x
    flag = getattr(fd, "is_repeated", None)
    return flag if flag is not None else fd.label == descriptor.FieldDescriptor.LABEL_REPEATED


def is_required(fd) -> bool:
    flag = getattr(fd, "is_required", None)
    return flag if flag is not None else fd.label == descriptor.FieldDescriptor.LABEL_REQUIRED


# --- (a) the committed descriptor matches proto/caffe.proto -------------------

@pytest.mark.skipif(shutil.which("protoc") is None, reason="protoc not on PATH")
def test_descriptor_is_up_to_date():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_proto_descriptor.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_pure_python_runtime_loads_schema():
    """The descriptor is not tied to one protobuf backend."""
    code = ("from lrprune_caffe.schema.proto import pb; from google.protobuf import text_format;"
            "n = text_format.Parse('layer { name: \"p\" type: \"Pooling\" pooling_param { pool: AVE } }',"
            " pb.NetParameter()); assert n.layer[0].pooling_param.pool == pb.PoolingParameter.AVE")
    env = dict(os.environ, PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="python")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --- (b) the golden corpus, written by real Caffe, parses with nothing left over --

@pytest.mark.parametrize("case", CASE_PARAMS)
def test_golden_prototxt_parses(case):
    case = corpus_case(case)
    net = text_format.Parse((case / "model.prototxt").read_text(), pb.NetParameter())
    assert len(net.layer) + len(net.layers) > 0
    assert unknown_field_paths(net) == []


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_golden_caffemodel_parses_without_unknown_fields(case):
    case = corpus_case(case)
    data = (case / "model.caffemodel").read_bytes()
    net = pb.NetParameter.FromString(data)
    assert unknown_field_paths(net) == []
    # Second, representation-independent check: nothing is lost when unknown
    # fields are dropped (Caffe serializes canonically, so sizes match).
    net.DiscardUnknownFields()
    assert len(net.SerializeToString()) == len(data)
    layers = net.layers if case.name.endswith("_v1") else net.layer
    assert sum(len(lp.blobs) for lp in layers) > 0


def test_lenet_v1_uses_legacy_layers():
    case = require_shared(GOLDEN / "lenet_mnist_v1")
    for source in (text_format.Parse((case / "model.prototxt").read_text(), pb.NetParameter()),
                   pb.NetParameter.FromString((case / "model.caffemodel").read_bytes())):
        assert len(source.layers) > 0 and len(source.layer) == 0
        types = {lp.type for lp in source.layers}
        assert pb.V1LayerParameter.CONVOLUTION in types
        assert pb.V1LayerParameter.INNER_PRODUCT in types
    conv = next(lp for lp in source.layers if lp.type == pb.V1LayerParameter.CONVOLUTION)
    assert conv.blobs[0].num > 0 and len(conv.blobs[0].data) > 0


# --- (c) SSD fork layers ------------------------------------------------------

SSD_DEPLOY = """
name: "VGG_VOC0712_SSD_300x300_deploy"
input: "data"
input_shape { dim: 1 dim: 3 dim: 300 dim: 300 }
layer {
  name: "conv4_3_norm" type: "Normalize" bottom: "conv4_3" top: "conv4_3_norm"
  norm_param {
    across_spatial: false
    scale_filler { type: "constant" value: 20 }
    channel_shared: false
  }
}
layer {
  name: "conv4_3_norm_mbox_loc" type: "Convolution" bottom: "conv4_3_norm" top: "conv4_3_norm_mbox_loc"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param {
    num_output: 16 pad: 1 kernel_size: 3 stride: 1
    weight_filler { type: "xavier" } bias_filler { type: "constant" value: 0 }
  }
}
layer {
  name: "conv4_3_norm_mbox_loc_perm" type: "Permute"
  bottom: "conv4_3_norm_mbox_loc" top: "conv4_3_norm_mbox_loc_perm"
  permute_param { order: 0 order: 2 order: 3 order: 1 }
}
layer {
  name: "conv4_3_norm_mbox_loc_flat" type: "Flatten"
  bottom: "conv4_3_norm_mbox_loc_perm" top: "conv4_3_norm_mbox_loc_flat"
  flatten_param { axis: 1 }
}
layer {
  name: "conv4_3_norm_mbox_priorbox" type: "PriorBox"
  bottom: "conv4_3_norm" bottom: "data" top: "conv4_3_norm_mbox_priorbox"
  prior_box_param {
    min_size: 30.0 max_size: 60.0 aspect_ratio: 2 flip: true clip: false
    variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2
    step: 8 offset: 0.5
  }
}
layer {
  name: "mbox_conf_reshape" type: "Reshape" bottom: "mbox_conf" top: "mbox_conf_reshape"
  reshape_param { shape { dim: 0 dim: -1 dim: 21 } }
}
layer {
  name: "mbox_conf_softmax" type: "Softmax" bottom: "mbox_conf_reshape" top: "mbox_conf_softmax"
  softmax_param { axis: 2 }
}
layer {
  name: "detection_out" type: "DetectionOutput"
  bottom: "mbox_loc" bottom: "mbox_conf_flatten" bottom: "mbox_priorbox" top: "detection_out"
  include { phase: TEST }
  detection_output_param {
    num_classes: 21 share_location: true background_label_id: 0
    nms_param { nms_threshold: 0.45 top_k: 400 }
    save_output_param {
      output_directory: "data/VOCdevkit/results/VOC2007/SSD_300x300/Main"
      output_name_prefix: "comp4_det_test_"
      output_format: "VOC"
      label_map_file: "data/VOC0712/labelmap_voc.prototxt"
      name_size_file: "data/VOC0712/test_name_size.txt"
      num_test_image: 4952
      resize_param { prob: 1 resize_mode: WARP height: 300 width: 300 interp_mode: LINEAR }
    }
    code_type: CENTER_SIZE
    keep_top_k: 200
    confidence_threshold: 0.01
  }
}
"""

SSD_TRAIN = """
layer {
  name: "data" type: "AnnotatedData" top: "data" top: "label"
  include { phase: TRAIN }
  transform_param {
    mirror: true mean_value: 104 mean_value: 117 mean_value: 123
    resize_param {
      prob: 1 resize_mode: WARP height: 300 width: 300
      interp_mode: LINEAR interp_mode: AREA interp_mode: NEAREST interp_mode: CUBIC interp_mode: LANCZOS4
    }
    emit_constraint { emit_type: CENTER }
    distort_param {
      brightness_prob: 0.5 brightness_delta: 32 contrast_prob: 0.5 contrast_lower: 0.5
      contrast_upper: 1.5 hue_prob: 0.5 hue_delta: 18 saturation_prob: 0.5
      saturation_lower: 0.5 saturation_upper: 1.5 random_order_prob: 0.0
    }
    expand_param { prob: 0.5 max_expand_ratio: 4.0 }
  }
  data_param { source: "examples/VOC0712/VOC0712_trainval_lmdb" batch_size: 32 backend: LMDB }
  annotated_data_param {
    batch_sampler { max_sample: 1 max_trials: 1 }
    batch_sampler {
      sampler { min_scale: 0.3 max_scale: 1.0 min_aspect_ratio: 0.5 max_aspect_ratio: 2.0 }
      sample_constraint { min_jaccard_overlap: 0.1 }
      max_sample: 1 max_trials: 50
    }
    label_map_file: "data/VOC0712/labelmap_voc.prototxt"
  }
}
layer {
  name: "mbox_loss" type: "MultiBoxLoss"
  bottom: "mbox_loc" bottom: "mbox_conf" bottom: "mbox_priorbox" bottom: "label" top: "mbox_loss"
  include { phase: TRAIN }
  propagate_down: true propagate_down: true propagate_down: false propagate_down: false
  loss_param { normalization: VALID }
  multibox_loss_param {
    loc_loss_type: SMOOTH_L1 conf_loss_type: SOFTMAX loc_weight: 1.0 num_classes: 21
    share_location: true match_type: PER_PREDICTION overlap_threshold: 0.5
    use_prior_for_matching: true background_label_id: 0 use_difficult_gt: true
    neg_pos_ratio: 3.0 neg_overlap: 0.5 code_type: CENTER_SIZE ignore_cross_boundary_bbox: false
    mining_type: MAX_NEGATIVE
  }
}
layer {
  name: "detection_eval" type: "DetectionEvaluate"
  bottom: "detection_out" bottom: "label" top: "detection_eval"
  include { phase: TEST }
  detection_evaluate_param {
    num_classes: 21 background_label_id: 0 overlap_threshold: 0.5 evaluate_difficult_gt: false
    name_size_file: "data/VOC0712/test_name_size.txt"
  }
}
layer {
  name: "video" type: "VideoData" top: "data"
  video_data_param { video_type: VIDEO video_file: "clip.mp4" skip_frames: 2 }
}
"""


def test_ssd_deploy_snippet_parses():
    net = text_format.Parse(SSD_DEPLOY, pb.NetParameter())
    by_name = {lp.name: lp for lp in net.layer}

    norm = by_name["conv4_3_norm"].norm_param
    assert not norm.across_spatial and not norm.channel_shared and norm.scale_filler.value == 20
    assert list(by_name["conv4_3_norm_mbox_loc_perm"].permute_param.order) == [0, 2, 3, 1]

    prior = by_name["conv4_3_norm_mbox_priorbox"].prior_box_param
    assert list(prior.min_size) == [30.0] and list(prior.max_size) == [60.0]
    assert prior.flip and not prior.clip and prior.step == 8 and prior.offset == 0.5
    assert [round(v, 3) for v in prior.variance] == [0.1, 0.1, 0.2, 0.2]

    det = by_name["detection_out"].detection_output_param
    assert det.num_classes == 21 and det.keep_top_k == 200
    assert det.code_type == pb.PriorBoxParameter.CENTER_SIZE
    assert abs(det.nms_param.nms_threshold - 0.45) < 1e-6 and det.nms_param.top_k == 400
    assert det.save_output_param.resize_param.resize_mode == pb.ResizeParameter.WARP
    assert list(det.save_output_param.resize_param.interp_mode) == [pb.ResizeParameter.LINEAR]
    assert by_name["detection_out"].include[0].phase == pb.TEST

    # binary and text round trips keep every SSD field
    again = pb.NetParameter.FromString(net.SerializeToString())
    assert again == net
    assert text_format.Parse(text_format.MessageToString(net), pb.NetParameter()) == net


def test_ssd_defaults_match_fork():
    assert pb.PriorBoxParameter().flip is True and pb.PriorBoxParameter().clip is False
    assert pb.NormalizeParameter().across_spatial is True
    assert abs(pb.NormalizeParameter().eps - 1e-10) < 1e-16
    assert pb.DetectionOutputParameter().code_type == pb.PriorBoxParameter.CORNER
    assert pb.DetectionOutputParameter().keep_top_k == -1
    assert abs(pb.NonMaximumSuppressionParameter().nms_threshold - 0.3) < 1e-6
    assert pb.MultiBoxLossParameter().mining_type == pb.MultiBoxLossParameter.MAX_NEGATIVE


def test_ssd_train_snippet_parses():
    net = text_format.Parse(SSD_TRAIN, pb.NetParameter())
    data, loss, evaluate, video = net.layer
    assert data.transform_param.resize_param.height == 300
    assert data.transform_param.expand_param.max_expand_ratio == 4.0
    assert data.transform_param.emit_constraint.emit_type == pb.EmitConstraint.CENTER
    assert len(data.annotated_data_param.batch_sampler) == 2
    assert data.annotated_data_param.batch_sampler[1].sample_constraint.min_jaccard_overlap == pytest.approx(0.1)
    assert loss.multibox_loss_param.code_type == pb.PriorBoxParameter.CENTER_SIZE
    assert evaluate.detection_evaluate_param.num_classes == 21
    assert video.video_data_param.video_type == pb.VideoDataParameter.VIDEO


# --- (d) field numbers are BVLC's (and the SSD fork's) --------------------------

@pytest.mark.parametrize("message, name, number", [
    ("LayerParameter", "blobs", 7),
    ("LayerParameter", "convolution_param", 106),
    ("LayerParameter", "transform_param", 100),
    ("LayerParameter", "pooling_param", 121),
    ("LayerParameter", "input_param", 143),
    ("LayerParameter", "recurrent_param", 146),
    ("LayerParameter", "swish_param", 147),
    ("LayerParameter", "clip_param", 148),
    ("V1LayerParameter", "blobs", 6),
    ("V1LayerParameter", "type", 5),
    ("V1LayerParameter", "layer", 1),
    ("NetParameter", "layer", 100),
    ("NetParameter", "layers", 2),
    ("NetParameter", "input", 3),
    ("NetParameter", "input_dim", 4),
    ("NetParameter", "input_shape", 8),
    ("BlobProto", "data", 5),
    ("BlobProto", "shape", 7),
    ("BlobProto", "double_data", 8),
    ("BlobShape", "dim", 1),
    ("SolverParameter", "layer_wise_reduce", 41),
    ("SolverParameter", "weights", 42),
    # SSD fork (weiliu89/caffe, branch ssd)
    ("LayerParameter", "annotated_data_param", 200),
    ("LayerParameter", "multibox_loss_param", 201),
    ("LayerParameter", "permute_param", 202),
    ("LayerParameter", "prior_box_param", 203),
    ("LayerParameter", "detection_output_param", 204),
    ("LayerParameter", "detection_evaluate_param", 205),
    ("LayerParameter", "norm_param", 206),
    ("LayerParameter", "video_data_param", 207),
    ("TransformationParameter", "resize_param", 8),
    ("TransformationParameter", "emit_constraint", 10),
    ("TransformationParameter", "distort_param", 13),
    ("TransformationParameter", "expand_param", 14),
])
def test_field_numbers(message, name, number):
    assert field(message, name).number == number


def test_packed_and_types():
    data = field("BlobProto", "data")
    assert data.type == descriptor.FieldDescriptor.TYPE_FLOAT and is_repeated(data)
    for name in ("data", "diff", "double_data", "double_diff"):
        options = field("BlobProto", name).GetOptions()
        assert options.HasField("packed") and options.packed, name
    dim = field("BlobShape", "dim")
    assert dim.type == descriptor.FieldDescriptor.TYPE_INT64 and dim.GetOptions().packed
    # proto2 repeated scalars without the option stay unpacked, as in Caffe
    assert not field("NetParameter", "input_dim").GetOptions().HasField("packed")
    assert field("BlobProto", "num").type == descriptor.FieldDescriptor.TYPE_INT32
    assert field("NetParameter", "input_dim").type == descriptor.FieldDescriptor.TYPE_INT32
    assert is_required(field("ClipParameter", "min")) and is_required(field("ClipParameter", "max"))
    # packed encoding on the wire: field 5, wire type 2 (length-delimited)
    assert pb.BlobProto(data=[1.0, 2.0]).SerializeToString()[:1] == bytes([5 << 3 | 2])


def test_enums_and_defaults():
    assert pb.TRAIN == 0 and pb.TEST == 1
    assert pb.Phase.Value("TEST") == 1 and pb.enum("Phase").values_by_name["TRAIN"].number == 0
    assert pb.NetState().phase == pb.TEST
    assert pb.PoolingParameter.MAX == 0 and pb.PoolingParameter.AVE == 1
    assert pb.PoolingParameter().round_mode == pb.PoolingParameter.CEIL
    assert pb.V1LayerParameter.CONVOLUTION == 4 and pb.V1LayerParameter.INNER_PRODUCT == 14
    assert pb.V1LayerParameter.DECONVOLUTION == 39 and pb.V1LayerParameter.ABSVAL == 35
    assert pb.EltwiseParameter().operation == pb.EltwiseParameter.SUM
    assert pb.ConvolutionParameter().bias_term is True and pb.ConvolutionParameter().group == 1
    assert pb.FillerParameter().type == "constant"
    assert pb.SolverParameter().type == "SGD" and pb.SolverParameter().solver_mode == pb.SolverParameter.GPU


def test_every_top_level_message_is_exposed():
    names = set(pb.DESCRIPTOR.message_types_by_name)
    for required in ("NetParameter", "LayerParameter", "V1LayerParameter", "V0LayerParameter", "BlobProto",
                     "BlobShape", "BlobProtoVector", "Datum", "FillerParameter", "SolverParameter",
                     "SolverState", "NetState", "NetStateRule", "ParamSpec", "PoolingParameter",
                     "AnnotatedDatum", "LabelMap"):
        assert required in names
    for name in names:
        assert getattr(pb, name).DESCRIPTOR.full_name == f"caffe.{name}"


def test_unknown_field_detector_is_not_vacuous():
    """A field this schema lacks (here number 999 inside a layer) is caught."""
    layer = pb.LayerParameter(name="x").SerializeToString() + bytes([0xB8, 0x3E, 0x01])  # field 999 = 1
    net = pb.NetParameter.FromString(bytes([0xA2, 0x06, len(layer)]) + layer)  # NetParameter.layer (100)
    assert net.layer[0].name == "x"
    assert unknown_field_paths(net) == [".layer[0]"]
    size = len(net.SerializeToString())
    net.DiscardUnknownFields()
    assert len(net.SerializeToString()) < size
