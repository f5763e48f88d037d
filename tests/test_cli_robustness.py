"""Bad requests found by auditing the CLI from the user's side: each gets ONE line on stderr,
exit status 2, no traceback, nothing written; and the compress report says what it did."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import golden_case, lenet_files, run_cli


def one_line_error(rc, out, err, needle):
    lines = [l for l in err.strip().splitlines() if l]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]


def unknown_layer_net(tmp_path):
    d, proto, model = lenet_files()
    text = open(proto).read()
    i = text.index('layer { name: "prob"')
    text = text[:i] + 'layer { name: "weird/x" type: "MyCustom" bottom: "ip2" top: "w" }\n' + text[i:]
    p = tmp_path / "unknown.prototxt"
    p.write_text(text)
    return str(p), model


def test_argparse_errors_are_one_line(capsys):
    _, proto, model = lenet_files()
    rc, out, err = run_cli(capsys, "compress", proto, model, "-o", "x", "--rank", "4", "--energy", "0.9")
    one_line_error(rc, out, err, "not allowed with argument --rank")
    rc, out, err = run_cli(capsys, "compress")
    one_line_error(rc, out, err, "required")


def test_missing_required_field_names_the_layer(tmp_path, capsys):
    p = tmp_path / "clip.prototxt"
    p.write_text('input: "data" input_shape { dim: 1 dim: 3 }\n'
                 'layer { name: "c" type: "Clip" bottom: "data" top: "c" clip_param { min: 1 } }\n')
    rc, out, err = run_cli(capsys, "inspect", p)
    one_line_error(rc, out, err, "layer 'c' (Clip): required field 'clip_param.max' is not set")


def test_verify_nets_with_different_input_shapes(capsys):
    _, proto, model = lenet_files()
    a = golden_case("alexnet_mini")
    rc, out, err = run_cli(capsys, "verify", proto, model, a / "model.prototxt", a / "model.caffemodel")
    one_line_error(rc, out, err, "cannot take the same inputs")
    assert "(1, 1, 28, 28)" in err and "(1, 3, 99, 99)" in err


def test_unknown_layer_compress_is_written_unverified_and_bench_refuses(tmp_path, capsys):
    pytest.importorskip("cv2")
    proto, model = unknown_layer_net(tmp_path)
    out = tmp_path / "o"
    rc, stdout, err = run_cli(capsys, "compress", proto, model, "-o", out, "--rank", "4")
    assert rc == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["verification"]["skipped"] and "MyCustom" in rep["verification"]["reason"]
    assert any("not verified" in n for n in rep["notes"])
    rc, stdout, err = run_cli(capsys, "bench", proto, model, "--runtime", "opencv", "--runs", "2")
    one_line_error(rc, stdout, err, 'of type "MyCustom"')


def test_export_onnx_output_is_a_folder_or_unwritable(tmp_path, capsys):
    _, proto, model = lenet_files()
    rc, out, err = run_cli(capsys, "export-onnx", proto, model, "-o", tmp_path)
    one_line_error(rc, out, err, "is a folder")
    (tmp_path / "afile").write_text("x")
    rc, out, err = run_cli(capsys, "export-onnx", proto, model, "-o", tmp_path / "afile" / "m.onnx")
    one_line_error(rc, out, err, "is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "x"


def test_compress_input_and_option_checks(tmp_path, capsys):
    d, proto, model = lenet_files()
    out = tmp_path / "o"
    rc, o, err = run_cli(capsys, "compress", proto, model, "-o", out, "--rank", "4", "--labels", d / "labels.npz")
    one_line_error(rc, o, err, "--labels are the labels of --inputs")
    x = np.load(d / "inputs.npz")["data"][:4].copy()
    x[0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", data=x)
    rc, o, err = run_cli(capsys, "compress", proto, model, "-o", out, "--rank", "4", "--inputs", tmp_path / "nan.npz")
    one_line_error(rc, o, err, "NaN")
    rc, o, err = run_cli(capsys, "compress", proto, model, "-o", out, "--prune", "0.5", "--prune-method", "std",
                         "--quality", "1")
    one_line_error(rc, o, err, "takes no fraction")
    rc, o, err = run_cli(capsys, "compress", proto, model, "-o", out, "--rank", "4", "--opset", "11")
    one_line_error(rc, o, err, "add --onnx")
    (tmp_path / "junk.npz").write_text("not an archive")
    rc, o, err = run_cli(capsys, "compress", proto, model, "-o", out, "--rank", "4", "--inputs", tmp_path / "junk.npz")
    one_line_error(rc, o, err, "is not an .npz archive")
    assert not out.exists()


def test_compress_onnx_opset(tmp_path, capsys):
    import onnx
    _, proto, model = lenet_files()
    rc, o, err = run_cli(capsys, "compress", proto, model, "-o", tmp_path / "o", "--rank", "4", "--onnx",
                         "--opset", "11", "--no-verify")
    assert rc == 0, err
    m = onnx.load(str(tmp_path / "o" / "model.onnx"))
    assert [op.version for op in m.opset_import if op.domain in ("", "ai.onnx")] == [11]


def test_report_outcome_reasons_and_structured_rank(tmp_path, capsys):
    _, proto, model = lenet_files()
    rc, o, err = run_cli(capsys, "compress", proto, model, "-o", tmp_path / "a", "--prune", "conv1=0.5,ip1=0.9",
                         "--prune-exclude", "ip2", "--no-verify", "--json")
    assert rc == 0, err
    rep = json.loads(o)
    rows = {r["name"]: r for r in rep["layers"]}
    assert rows["ip2"]["action"] == "kept" and "--prune-exclude" in rows["ip2"]["reason"]
    assert rows["conv2"]["action"] == "kept" and "not selected for pruning" in rows["conv2"]["reason"]
    assert rows["ip1"]["action"] == "pruned" and "reason" not in rows["ip1"]
    assert rep["outcome"]["faster"] is False and "not faster" in rep["outcome"]["summary"]
    assert "not smaller" in rep["outcome"]["summary"]
    assert rep["totals"]["nonzero_params_before"] == 431079  # one weight of the real LeNet is exactly 0
    rc, o, err = run_cli(capsys, "compress", proto, model, "-o", tmp_path / "b", "--speedup", "2", "--prune", "0.5",
                         "--prune-structured", "--no-verify", "--json")
    assert rc == 0, err
    rep = json.loads(o)
    rows = {r["name"]: r for r in rep["layers"]}
    conv2 = rows["conv2"]
    assert conv2["action"] == "factorized+pruned" and conv2["rank"] == conv2["rank_factorized"] // 2
    from lrprune_caffe.io.caffe import load_net
    net = load_net(tmp_path / "b" / "model.prototxt")
    assert net.layer("conv2_lr1").param_msg("convolution_param").num_output == conv2["rank"]
    assert rows["ip2"]["action"] == "shrunk"
    assert rep["outcome"]["faster"] and "smaller than the original" in rep["outcome"]["summary"]


def test_convert_all_phases_keeps_the_phase_rules(tmp_path, capsys):
    d = golden_case("lenet_mnist")
    from lrprune_caffe.io.caffe import parse_prototxt, read_net
    out = tmp_path / "o"
    rc, o, err = run_cli(capsys, "convert", d / "train_test.prototxt", d / "model.caffemodel", "-o", out,
                         "--all-phases")
    assert rc == 0, err
    written = parse_prototxt(out / "model.prototxt")
    original = parse_prototxt(d / "train_test.prototxt")
    assert [l.name for l in written.layer] == [l.name for l in original.layer]
    assert [[r.phase for r in l.include] for l in written.layer] == [[r.phase for r in l.include]
                                                                    for l in original.layer]
    for phase in ("TEST", "TRAIN"):  # each view of the written net is the original's view
        a, b = read_net(out / "model.prototxt", phase), read_net(d / "train_test.prototxt", phase)
        assert [l.name for l in a.layers] == [l.name for l in b.layers]
    from lrprune_caffe.io.caffe import read_caffemodel
    back = {w.name: w.blobs for w in read_caffemodel(out / "model.caffemodel")}
    ref = {w.name: w.blobs for w in read_caffemodel(d / "model.caffemodel")}
    for name in ("conv1", "conv2", "ip1", "ip2"):
        assert all(np.array_equal(x, y) for x, y in zip(back[name], ref[name]))


def test_stage_and_level_from_the_cli(tmp_path, capsys):
    p = tmp_path / "staged.prototxt"
    p.write_text('input: "data" input_shape { dim: 1 dim: 4 }\n'
                 'layer { name: "a" type: "ReLU" bottom: "data" top: "a" }\n'
                 'layer { name: "b" type: "Sigmoid" bottom: "a" top: "b" include { phase: TEST stage: "deploy" } }\n'
                 'layer { name: "c" type: "TanH" bottom: "a" top: "c" include { phase: TEST min_level: 2 } }\n')

    def names(*extra):
        rc, out, err = run_cli(capsys, "inspect", p, "--json", *extra)
        assert rc == 0, err
        return [l["name"] for l in json.loads(out)["layers"] if l["type"] != "Input"]
    assert names() == ["a"]
    assert names("--stage", "deploy") == ["a", "b"]
    assert names("--level", "2") == ["a", "c"]
    assert names("--stage", "deploy", "--level", "3") == ["a", "b", "c"]
    rc, out, err = run_cli(capsys, "convert", p, "-o", tmp_path / "o", "--stage", "deploy")
    assert rc == 0 and '"b"' in (tmp_path / "o" / "model.prototxt").read_text()
