"""Bad input files: ONE line on stderr, exit status 2, no traceback, nothing written.

Every case runs through ``lrprune_caffe.cli.main.main`` as ``inspect`` and as
``convert`` (into a new OUTDIR, which must not appear, and into an existing
empty OUTDIR, which must stay empty). The example LeNet in ``examples/lenet``
(a project file) is the good model the broken ones are made from.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lrprune_caffe.io import prototxt as prototxt_io
from lrprune_caffe.cli.main import main
from lrprune_caffe.errors import UserError
from lrprune_caffe.ir.net import array_to_blobproto
from lrprune_caffe.schema.proto import pb

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lenet"
PROTO, MODEL = EXAMPLE / "lenet.prototxt", EXAMPLE / "lenet.caffemodel"

INPUT = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }\n'


def text(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content)
    return str(p)


def lenet_with(tmp_path, old, new, name="edited.prototxt"):
    src = PROTO.read_text()
    assert old in src
    return text(tmp_path, name, src.replace(old, new, 1))


# each builder: tmp_path -> (positional args, [regexes the one-line message must match])
def missing_prototxt(t):
    return [str(t / "nope.prototxt")], [r"nope\.prototxt", "no such file", r"\.prototxt"]


def missing_weights(t):
    return [str(PROTO), str(t / "nope.caffemodel")], [r"nope\.caffemodel", "no such file", r"\.caffemodel"]


def folder_as_prototxt(t):
    (t / "adir").mkdir()
    return [str(t / "adir")], ["adir", "is a folder"]


def syntax_error(t):
    p = text(t, "broken.prototxt", 'name: "x"\n' + INPUT + 'layer {\n  name: "r"\n  type: "ReLU"\n  bottom: "data"\n')
    # the missing "}" is noticed at the end of the file, after the last token (line 6)
    return [p], [r"broken\.prototxt:6:\d+: ", "syntax error", r'Expected "}"']


def syntax_error_colon(t):
    p = text(t, "colon.prototxt", 'name: "x"\nlayer {\n  name: "r"\n  type "ReLU"\n}\n')
    return [p], [r"colon\.prototxt:4:8: ", "syntax error", r'Expected ":"']


def syntax_error_value(t):
    p = text(t, "value.prototxt", INPUT + 'layer { name: "c" type: "Convolution" bottom: "data" top: "c"\n'
                                           '  convolution_param { num_output: 2.5 kernel_size: 3 } }\n')
    return [p], [r"value\.prototxt:3:\d+: ", "integer", "2.5"]


def syntax_error_field(t):
    p = text(t, "typo.prototxt", 'name: "x"\n' + INPUT + 'layer { name: "r" tpye: "ReLU" }\n')
    return [p], [r"typo\.prototxt:3:19: ", "syntax error", "tpye"]


def truncated_caffemodel(t):
    p = t / "trunc.caffemodel"
    p.write_bytes(MODEL.read_bytes()[:100_000])
    return [str(PROTO), str(p)], [r"trunc\.caffemodel", "truncated"]


def random_caffemodel(t):
    p = t / "random.caffemodel"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    return [str(PROTO), str(p)], [r"random\.caffemodel", "not a valid caffemodel"]


def empty_caffemodel(t):
    (t / "empty.caffemodel").write_bytes(b"")
    return [str(PROTO), str(t / "empty.caffemodel")], [r"empty\.caffemodel", "is empty"]


def prototxt_as_weights(t):
    return [str(PROTO), str(PROTO)], [r"lenet\.prototxt", "is a text prototxt", r"expected a binary \.caffemodel"]


def caffemodel_as_prototxt(t):
    return [str(MODEL)], [r"lenet\.caffemodel", "binary", r"expected a text \.prototxt"]


def weights_of_another_net(t):
    msg = pb.NetParameter(name="other")
    lp = msg.layer.add(name="fc_other", type="InnerProduct")
    lp.blobs.add().CopyFrom(array_to_blobproto(np.ones((2, 3), np.float32)))
    (t / "other.caffemodel").write_bytes(msg.SerializeToString())
    return [str(PROTO), str(t / "other.caffemodel")], ["no layer of this weights file matches", "fc_other"]


def blob_shape_mismatch(t):
    p = lenet_with(t, "num_output: 500", "num_output: 400")
    return [p, str(MODEL)], [r"layer 'ip1' \(InnerProduct\)", r"\(500, 800\)", r"\(400, 800\)",
                             r"lenet\.caffemodel"]


def blob_count_mismatch(t):
    src = PROTO.read_text()
    i = src.index('name: "ip2"')
    j = src.index("num_output: 10", i)
    p = text(t, "nobias.prototxt", src[:j] + "bias_term: false\n    " + src[j:])
    return [p, str(MODEL)], [r"layer 'ip2' \(InnerProduct\)", "has 2 blobs, expected 1"]


def bottom_not_produced(t):
    p = text(t, "nobottom.prototxt", INPUT + 'layer { name: "c" type: "Convolution" bottom: "nope" top: "c" '
                                             'convolution_param { num_output: 2 kernel_size: 3 } }\n')
    return [p], [r"layer 'c' \(Convolution\)", "bottom 'nope'", "not produced"]


def duplicate_names(t):
    p = text(t, "dup.prototxt", INPUT + 'layer { name: "r" type: "ReLU" bottom: "data" top: "data" }\n'
                                        'layer { name: "r" type: "Sigmoid" bottom: "data" top: "data" }\n')
    return [p], [r"layer 'r' \(Sigmoid\)", "duplicate layer name"]


def zero_dim(t):
    p = text(t, "zero.prototxt", INPUT.replace("dim: 3", "dim: 0"))
    return [p], [r"layer 'data' \(Input\)", r"\(1, 0, 8, 8\)", "positive"]


def negative_dim(t):
    p = text(t, "neg.prototxt", 'input: "data"\ninput_dim: 1\ninput_dim: 3\ninput_dim: -8\ninput_dim: 8\n'
                                'layer { name: "r" type: "ReLU" bottom: "data" top: "data" }\n')
    return [p], [r"\(Input\)", r"\(1, 3, -8, 8\)", "positive"]


def zero_num_output(t):
    p = text(t, "zero_out.prototxt", INPUT + 'layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
                                              'convolution_param { kernel_size: 3 } }\n')
    return [p], [r"layer 'c' \(Convolution\)", "num_output must be >= 1, got 0"]


def reshape_to_nothing(t):
    p = text(t, "reshape.prototxt", INPUT + 'layer { name: "r" type: "Reshape" bottom: "data" top: "r" '
                                             'reshape_param { shape { dim: 0 dim: -5 } } }\n')
    return [p], [r"layer 'r' \(Reshape\)", "-5"]


def conv_kernel_too_large(t):
    p = text(t, "bigk.prototxt", INPUT + 'layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
                                          'convolution_param { num_output: 2 kernel_size: 11 pad: 1 } }\n')
    return [p], [r"layer 'c' \(Convolution\)", "kernel 11x11", "larger than the padded input 10x10"]


def pool_kernel_too_large(t):
    p = lenet_with(t, "kernel_size: 2", "kernel_size: 30")  # pool1 on a 24x24 map
    return [p], [r"layer 'pool1' \(Pooling\)", "kernel 30x30", "larger than the padded input 24x24"]


def empty_net(t):
    return [text(t, "empty.prototxt", 'name: "nothing"\n')], [r"empty\.prototxt", "no layers"]


def empty_file(t):
    return [text(t, "blank.prototxt", "")], [r"blank\.prototxt", "no layers"]


def unknown_enum_name(t):
    p = lenet_with(t, "pool: MAX", "pool: MEDIAN", "enum.prototxt")
    line = next(i for i, s in enumerate(Path(p).read_text().splitlines(), 1) if "MEDIAN" in s)
    return [p], [rf"enum\.prototxt:{line}:\d+: ", "PoolMethod", "MEDIAN"]


def unknown_enum_number(t):
    p = text(t, "enum7.prototxt", INPUT + 'layer { name: "p" type: "Pooling" bottom: "data" top: "p" '
                                           'pooling_param { pool: 7 kernel_size: 2 } }\n')
    return [p], [r"enum7\.prototxt:2:\d+: ", "PoolMethod", "number 7"]


def unknown_v1_type(t):
    p = text(t, "v1.prototxt", 'input: "data"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 8\ninput_dim: 8\n'
                               'layers { name: "r" type: FOO bottom: "data" top: "r" }\n')
    return [p], [r"v1\.prototxt:6:\d+: ", "LayerType", "FOO"]


def v0_format(t):
    p = text(t, "v0.prototxt", 'input: "data"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 8\ninput_dim: 8\n'
                               'layers { layer { name: "conv1" type: "conv" num_output: 2 kernelsize: 3 } '
                               'bottom: "data" top: "conv1" }\n')
    return [p], [r"layer 'conv1'", "V0", "upgrade_net_proto_text"]


def wrong_input_dim_count(t):
    p = text(t, "dims.prototxt", 'input: "data"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 8\n'
                                 'layer { name: "r" type: "ReLU" bottom: "data" top: "data" }\n')
    return [p], ["3 input_dim values for 1 inputs"]


def caffemodel_over_2gb(t):
    p = t / "huge.caffemodel"
    with open(p, "wb") as f:
        f.truncate(2**31 + 10)  # sparse: takes no disk space
    return [str(PROTO), str(p)], [r"huge\.caffemodel", "2,147,483,658 bytes", "2 GB"]


CASES = [missing_prototxt, missing_weights, folder_as_prototxt, syntax_error, syntax_error_colon,
         syntax_error_value, syntax_error_field,
         truncated_caffemodel, random_caffemodel, empty_caffemodel, prototxt_as_weights,
         caffemodel_as_prototxt, weights_of_another_net, blob_shape_mismatch, blob_count_mismatch,
         bottom_not_produced, duplicate_names, zero_dim, negative_dim, zero_num_output, reshape_to_nothing,
         conv_kernel_too_large, pool_kernel_too_large, empty_net, empty_file, unknown_enum_name,
         unknown_enum_number, unknown_v1_type, v0_format, wrong_input_dim_count, caffemodel_over_2gb]


@pytest.fixture
def no_huge_reads(monkeypatch):
    """Fail the test if anything opens a file over 2 GB for reading."""
    real_open = open

    def guarded(file, mode="r", *args, **kwargs):
        if "r" in mode and os.path.exists(file) and os.path.getsize(file) > 2**31:
            raise AssertionError(f"{file} was opened for reading")
        return real_open(file, mode, *args, **kwargs)
    monkeypatch.setattr(prototxt_io, "open", guarded, raising=False)


def assert_one_line_error(rc, out, err, patterns):
    assert rc == 2, (rc, err)
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lrprune-caffe: error: ")
    for pat in patterns:
        assert re.search(pat, lines[0]), f"{pat!r} not in {lines[0]!r}"


@pytest.mark.parametrize("command", ["inspect", "convert-new", "convert-existing"])
@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__)
def test_bad_input(case, command, tmp_path, capsys, no_huge_reads):
    files = tmp_path / "in"
    files.mkdir()
    args, patterns = case(files)
    before = sorted(p.name for p in files.iterdir())
    outdir = tmp_path / "out"
    if command == "inspect":
        argv = ["inspect", *args]
    else:
        if command == "convert-existing":
            outdir.mkdir()
        argv = ["convert", *args, "-o", str(outdir)]
    rc = main(argv)
    out, err = capsys.readouterr()
    assert_one_line_error(rc, out, err, patterns)
    if command == "convert-new":
        assert not outdir.exists()
    elif command == "convert-existing":
        assert list(outdir.iterdir()) == []
    assert sorted(p.name for p in files.iterdir()) == before  # nothing beside the inputs either


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_and_still_exits_2(tmp_path, capsys, where):
    target = str(tmp_path / "nope.prototxt")
    argv = ["--debug", "inspect", target] if where == "before" else ["inspect", target, "--debug"]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" in err and "BadFileError" in err
    assert err.rstrip().splitlines()[-1].startswith("lrprune-caffe: error: ")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_unreadable_file_chmod(tmp_path, capsys):
    p = tmp_path / "locked.prototxt"
    shutil.copy(PROTO, p)
    p.chmod(0)
    try:
        rc = main(["inspect", str(p)])
    finally:
        p.chmod(0o644)
    assert_one_line_error(rc, *capsys.readouterr(), [r"locked\.prototxt", "permission denied"])


@pytest.mark.parametrize("exc, words", [(PermissionError(13, "Permission denied"), "permission denied"),
                                        (OSError(5, "Input/output error"), "Input/output error")])
def test_unreadable_file(tmp_path, capsys, monkeypatch, exc, words):
    """Works as root too: the read itself fails."""
    def failing_open(*a, **k):
        raise exc
    monkeypatch.setattr(prototxt_io, "open", failing_open, raising=False)
    outdir = tmp_path / "out"
    rc = main(["convert", str(PROTO), str(MODEL), "-o", str(outdir)])
    assert_one_line_error(rc, *capsys.readouterr(), [r"lenet\.prototxt", "cannot be read", words])
    assert not outdir.exists()


class _FailingFile:
    def __init__(self, *a, **k):
        self.n = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, data):
        self.n += 1
        if self.n > 2:
            raise OSError(28, "No space left on device")


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
def test_write_failure_leaves_nothing(tmp_path, capsys, monkeypatch, existing):
    """A disk that fills up half way through the caffemodel: no file, no folder left."""
    from lrprune_caffe.io import output
    monkeypatch.setattr(output, "open", _FailingFile, raising=False)
    outdir = tmp_path / "out"
    if existing:
        outdir.mkdir()
    rc = main(["convert", str(PROTO), str(MODEL), "-o", str(outdir)])
    assert_one_line_error(rc, *capsys.readouterr(), ["out", "No space left on device"])
    assert (list(outdir.iterdir()) == []) if existing else not outdir.exists()


def test_outdir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("keep me")
    rc = main(["convert", str(PROTO), str(MODEL), "-o", str(target)])
    assert_one_line_error(rc, *capsys.readouterr(), ["taken", "not a folder"])
    assert target.read_text() == "keep me"


def test_outdir_parents_created_and_removed_on_failure(tmp_path, capsys):
    rc = main(["convert", str(PROTO), "-o", str(tmp_path / "a" / "b")])
    assert rc == 0 and (tmp_path / "a" / "b" / "model.prototxt").exists()
    capsys.readouterr()
    from lrprune_caffe.fileutil import OutputSet
    with pytest.raises(RuntimeError):
        with OutputSet(tmp_path / "c" / "d") as o:
            o.write_text("model.prototxt", "x")
            raise RuntimeError("boom")
    assert not (tmp_path / "c").exists()
    (tmp_path / "f").write_text("a file")
    rc = main(["convert", str(PROTO), "-o", str(tmp_path / "f" / "g")])
    assert_one_line_error(rc, *capsys.readouterr(), ["not a folder"])


def test_user_error_is_one_line_too(capsys, monkeypatch):
    from lrprune_caffe import api

    def boom(*a, **k):
        raise UserError("first line\nsecond line")
    monkeypatch.setattr(api, "load_net", boom)
    rc = main(["inspect", str(PROTO)])
    assert_one_line_error(rc, *capsys.readouterr(), ["first line second line"])


def test_bad_input_in_a_real_process(tmp_path):
    """The installed entry point behaves the same: python -m lrprune_caffe."""
    bad = tmp_path / "bad.prototxt"
    bad.write_text(INPUT + 'layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
                           'convolution_param { num_output: 2 kernel_size: 11 } }\n')
    outdir = tmp_path / "out"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    res = subprocess.run([sys.executable, "-m", "lrprune_caffe", "convert", str(bad), "-o", str(outdir)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert_one_line_error(res.returncode, res.stdout, res.stderr, [r"layer 'c' \(Convolution\)", "kernel 11x11"])
    assert not outdir.exists()
