"""Caffe's data sources, built here with the libraries Caffe's tools write them with.

LMDB / LevelDB of Datum records (raw and PNG-encoded), ImageData lists, HDF5
source lists; and the DataTransformer against a literal transcription of
Caffe's ``data_transformer.cpp`` loop.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from lrprune_caffe.data.caffe_io import array_to_datum
from lrprune_caffe.data.stream import open_data
from lrprune_caffe.data.transformer import Transformer
from lrprune_caffe.errors import BadFileError, UserError

cv2 = pytest.importorskip("cv2")


def _images(n=7, c=3, h=6, w=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, c, h, w), dtype=np.uint8), rng.integers(0, 10, size=n)


def _write_lmdb(path, records):
    lmdb = pytest.importorskip("lmdb")
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, value in enumerate(records):
            txn.put(f"{i:08d}".encode(), value)
    env.close()


def _write_leveldb(path, records):
    plyvel = pytest.importorskip("plyvel")
    db = plyvel.DB(str(path), create_if_missing=True)
    for i, value in enumerate(records):
        db.put(f"{i:08d}".encode(), value)
    db.close()


def _all(ds, batch=3):
    xs, ys = zip(*ds.batches(batch))
    return np.concatenate(xs), np.concatenate(ys)


@pytest.mark.parametrize("writer", [_write_lmdb, _write_leveldb], ids=["lmdb", "leveldb"])
def test_raw_datum_db(tmp_path, writer):
    x, y = _images()
    writer(tmp_path / "db", [array_to_datum(a, lab) for a, lab in zip(x, y)])
    ds = open_data(tmp_path / "db")
    assert len(ds) == 7 and ds.sample_shape == (3, 6, 5)
    xs, ys = _all(ds)
    np.testing.assert_array_equal(xs, x.astype(np.float32))
    np.testing.assert_array_equal(ys, y)
    gx, gy = ds[4]  # random access = the 5th record in key order
    np.testing.assert_array_equal(gx, x[4])
    assert gy == y[4]
    # caffe test --iterations: full batches wrapping around at the end of the database
    wrapped = np.concatenate([b[1] for b in ds.batches(3, iterations=4)])
    np.testing.assert_array_equal(wrapped, np.concatenate([y, y])[:12])


def test_encoded_datum_decodes_as_caffe(tmp_path):
    x, y = _images(4)
    pngs = [cv2.imencode(".png", a.transpose(1, 2, 0))[1].tobytes() for a in x]  # BGR HWC, as Caffe's convert_imageset
    _write_lmdb(tmp_path / "db", [array_to_datum(None, lab, encoded=b) for b, lab in zip(pngs, y)])
    xs, ys = _all(open_data(tmp_path / "db"))
    np.testing.assert_array_equal(xs, x.astype(np.float32))  # PNG is lossless; BGR kept
    np.testing.assert_array_equal(ys, y)
    gray = open_data(tmp_path / "db", Transformer(decode="gray"))
    want = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_GRAYSCALE) for b in pngs]
    np.testing.assert_array_equal(_all(gray)[0][:, 0], np.stack(want).astype(np.float32))


def test_image_list(tmp_path):
    x, y = _images(3, h=8, w=10)
    (tmp_path / "imgs").mkdir()
    lines = []
    for i, (a, lab) in enumerate(zip(x, y)):
        name = f"im {i}.png"  # a space in the path: Caffe splits at the last space
        cv2.imwrite(str(tmp_path / "imgs" / name), a.transpose(1, 2, 0))
        lines.append(f"{name} {lab}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    ds = open_data(tmp_path / "list.txt", root_folder=str(tmp_path / "imgs") + "/", new_height=4, new_width=6)
    xs, ys = _all(ds)
    want = [cv2.resize(a.transpose(1, 2, 0), (6, 4)).transpose(2, 0, 1) for a in x]
    np.testing.assert_array_equal(xs, np.stack(want).astype(np.float32))
    np.testing.assert_array_equal(ys, y)
    gray = open_data(tmp_path / "list.txt", root_folder=str(tmp_path / "imgs") + "/", is_color=False)
    assert gray.sample_shape == (1, 8, 10)
    (tmp_path / "bad.txt").write_text("a.png\n")
    with pytest.raises(BadFileError, match="line 1"):
        open_data(tmp_path / "bad.txt")


def test_hdf5_source_list(tmp_path):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(1)
    parts = []
    for k, n in enumerate((5, 3)):
        d = rng.standard_normal((n, 2, 3, 3)).astype(np.float32)
        lab = rng.integers(0, 4, n).astype(np.float32)  # Caffe's HDF5 labels are usually float
        with h5py.File(tmp_path / f"p{k}.h5", "w") as f:
            f["data"], f["label"] = d, lab
        parts.append((d, lab))
    (tmp_path / "train.txt").write_text("p0.h5\np1.h5\n")  # relative to the list's folder
    ds = open_data(tmp_path / "train.txt")
    assert len(ds) == 8 and ds.sample_shape == (2, 3, 3)
    xs, ys = _all(ds)
    np.testing.assert_array_equal(xs, np.concatenate([p[0] for p in parts]))
    np.testing.assert_array_equal(ys, np.concatenate([p[1] for p in parts]).astype(np.int64))
    np.testing.assert_array_equal(ds[6][0], parts[1][0][1])


def _caffe_transform(datum, mean, scale, crop, h_off, w_off, mirror):
    """data_transformer.cpp's loop, transcribed."""
    c_, h_, w_ = datum.shape
    height = width = crop if crop else None
    height, width = (crop, crop) if crop else (h_, w_)
    out = np.zeros((c_, height, width), np.float32)
    d, m = datum.ravel(), None if mean is None else mean.ravel()
    o = out.ravel()
    for c in range(c_):
        for h in range(height):
            for w in range(width):
                di = (c * h_ + h_off + h) * w_ + w_off + w
                ti = (c * height + h) * width + (width - 1 - w if mirror else w)
                e = np.float32(d[di])
                o[ti] = (e - m[di]) * np.float32(scale) if m is not None else e * np.float32(scale)
    return out


def test_transformer_matches_caffe_loop():
    x, _ = _images(1, h=7, w=9)
    mean = np.random.default_rng(2).uniform(0, 255, (3, 7, 9)).astype(np.float32)
    t = Transformer(scale=0.017, mean=mean, crop=5, phase="TEST")
    np.testing.assert_array_equal(t(x[0]), _caffe_transform(x[0], mean, 0.017, 5, 1, 2, False))
    t.phase, t.mirror = "TRAIN", True
    seen = set()
    rng = np.random.default_rng(0)
    for _ in range(60):
        got = t(x[0], rng)
        hits = [(ho, wo, mi) for ho in range(3) for wo in range(5) for mi in (False, True)
                if np.array_equal(got, _caffe_transform(x[0], mean, 0.017, 5, ho, wo, mi))]
        assert hits, "a TRAIN output that is no crop/mirror Caffe could give"
        seen.update(hits)
    assert len(seen) > 10  # random crops and flips, not one fixed one
    tv = Transformer(scale=0.5, mean_values=(10.0,))
    np.testing.assert_array_equal(tv(x[0]), (x[0].astype(np.float32) - 10) * np.float32(0.5))
    with pytest.raises(BadFileError, match="mean file"):
        Transformer(mean=mean[:, :5])(x[0])


def test_stream_pickles_without_handles(tmp_path):
    x, y = _images()
    _write_lmdb(tmp_path / "db", [array_to_datum(a, lab) for a, lab in zip(x, y)])
    ds = open_data(tmp_path / "db")
    ds[0]
    ds2 = pickle.loads(pickle.dumps(ds))  # what a DataLoader worker gets
    np.testing.assert_array_equal(ds2[3][0], x[3])


def test_missing_extra_and_bad_db(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadFileError):
        open_data(tmp_path / "empty.txt")
    with pytest.raises((UserError, BadFileError)):
        open_data(tmp_path / "empty")  # neither a database nor an image folder with classes


def test_lmdb_pass_remaps_and_keeps_order(tmp_path, monkeypatch):
    import lrprune_caffe.data.sources as sources
    x, y = _images(9)
    _write_lmdb(tmp_path / "db", [array_to_datum(a, lab) for a, lab in zip(x, y)])
    monkeypatch.setattr(sources, "REMAP_BYTES", 200)  # remap every record or two
    ds = open_data(tmp_path / "db")
    xs, ys = _all(ds, 4)
    np.testing.assert_array_equal(xs, x.astype(np.float32))
    np.testing.assert_array_equal(ds[8][0], x[8])  # random access after the remaps
