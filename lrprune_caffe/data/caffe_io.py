"""Caffe's on-disk data records: ``Datum``, mean ``.binaryproto``, image decoding.

* :func:`datum_to_array`: a serialized ``Datum`` as Caffe's DataTransformer sees
  it, a C x H x W array (uint8 from ``data``, float32 from ``float_data``) and
  its label. Encoded records (``encoded: true``, JPEG/PNG bytes) are decoded
  the way Caffe's ``DecodeDatumToCVMat`` does: OpenCV's ``imdecode`` with
  ``IMREAD_ANYCOLOR`` (native channels), ``IMREAD_COLOR`` under
  ``force_color``, ``IMREAD_GRAYSCALE`` under ``force_gray`` (BGR order);
  channels/height/width then come from the image, not the record.
* :func:`read_image`: Caffe's ``ReadImageToCVMat(path, new_height, new_width,
  is_color)`` for ImageData list files: ``imread`` color (BGR) or gray, then
  ``cv::resize`` to new_width x new_height (bilinear) when both are set.
* :func:`read_mean_file`: a mean ``.binaryproto`` (BlobProto) as C x H x W float32.

OpenCV (``opencv-python-headless``) is what Caffe decodes with, so it is used
when installed; otherwise Pillow (converted to BGR), whose JPEG decoder and
resize may differ from OpenCV's by a few levels per pixel.
"""

from __future__ import annotations

import numpy as np

from lrprune_caffe.errors import BadFileError, UserError
from lrprune_caffe.schema.proto import pb

COLOR, GRAY, NATIVE = "color", "gray", "native"


def _cv2():
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise UserError("decoding images needs OpenCV or Pillow: pip install 'opencv-python-headless<5' "
                        "(what Caffe decodes with) or pip install Pillow") from None
    return Image


def decoder_name() -> str:
    return "opencv" if _cv2() is not None else "pillow"


def _hwc_to_chw(img) -> np.ndarray:
    if img.ndim == 2:
        img = img[:, :, None]
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def decode_image(buf: bytes, mode: str = NATIVE, where="image") -> np.ndarray:
    """JPEG/PNG bytes -> C x H x W uint8, BGR for 3 channels (Caffe's DecodeDatumToCVMat)."""
    cv2 = _cv2()
    if cv2 is not None:
        flag = {COLOR: cv2.IMREAD_COLOR, GRAY: cv2.IMREAD_GRAYSCALE, NATIVE: cv2.IMREAD_ANYCOLOR}[mode]
        img = cv2.imdecode(np.frombuffer(buf, np.uint8), flag)
        if img is None:
            raise BadFileError("cannot decode the encoded image (not a JPEG/PNG OpenCV reads)", path=where)
        return _hwc_to_chw(img)
    import io
    Image = _pil()
    try:
        with Image.open(io.BytesIO(buf)) as im:
            return _pil_to_chw(im, mode)
    except OSError as e:
        raise BadFileError(f"cannot decode the encoded image: {e}", path=where) from None


def _pil_to_chw(im, mode):
    if mode == GRAY or (mode == NATIVE and im.mode in ("L", "1", "I;16", "I")):
        arr = np.asarray(im.convert("L"))
    else:
        arr = np.asarray(im.convert("RGB"))[:, :, ::-1]
    return _hwc_to_chw(arr)


def datum_to_array(value: bytes, mode: str = NATIVE, where="record"):
    """A serialized Datum -> (C x H x W array, label). uint8 for raw/encoded pixels, float32 for float_data."""
    d = pb.Datum()
    try:
        d.ParseFromString(value)
    except Exception:
        raise BadFileError("a record is not a Caffe Datum", path=where) from None
    if d.encoded:
        return decode_image(d.data, mode, where), int(d.label)
    c, h, w = int(d.channels), int(d.height), int(d.width)
    n = c * h * w
    if n <= 0:
        raise BadFileError(f"a Datum has channels/height/width {c}/{h}/{w}", path=where)
    if len(d.data):
        if len(d.data) != n:
            raise BadFileError(f"a Datum holds {len(d.data)} bytes for {c}x{h}x{w} = {n} pixels", path=where)
        arr = np.frombuffer(d.data, np.uint8).reshape(c, h, w)
    else:
        if len(d.float_data) != n:
            raise BadFileError(f"a Datum holds {len(d.float_data)} float_data values for {c}x{h}x{w}",
                               path=where)
        arr = np.asarray(d.float_data, np.float32).reshape(c, h, w)
    return arr, int(d.label)


def array_to_datum(arr, label: int, encoded: bytes = None) -> bytes:
    """The inverse (for building test databases): C x H x W uint8 (or float) -> serialized Datum."""
    d = pb.Datum()
    d.label = int(label)
    if encoded is not None:
        d.encoded = True
        d.data = encoded
        return d.SerializeToString()
    arr = np.asarray(arr)
    d.channels, d.height, d.width = (int(v) for v in arr.shape)
    if arr.dtype == np.uint8:
        d.data = arr.tobytes()
    else:
        d.float_data.extend(arr.astype(np.float32).ravel().tolist())
    return d.SerializeToString()


def read_image(path, new_height=0, new_width=0, is_color=True) -> np.ndarray:
    """Caffe's ReadImageToCVMat: C x H x W uint8 (BGR or gray), resized when both sizes are set."""
    cv2 = _cv2()
    if cv2 is not None:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR if is_color else cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise BadFileError("cannot read the image (missing, or not an image OpenCV reads)", path=path)
        if new_height > 0 and new_width > 0:
            img = cv2.resize(img, (int(new_width), int(new_height)))
        return _hwc_to_chw(img)
    Image = _pil()
    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if is_color else "L")
            if new_height > 0 and new_width > 0:
                im = im.resize((int(new_width), int(new_height)), Image.BILINEAR)
            return _pil_to_chw(im, COLOR if is_color else GRAY)
    except OSError as e:
        raise BadFileError(f"cannot read the image: {e}", path=path) from None


def read_mean_file(path) -> np.ndarray:
    """A mean .binaryproto (BlobProto, 1 x C x H x W) as C x H x W float32."""
    from lrprune_caffe.ir.net import blobproto_to_array
    try:
        with open(path, "rb") as f:
            buf = f.read()
    except OSError as e:
        raise BadFileError(f"cannot read the mean file: {e.strerror}", path=path) from None
    bp = pb.BlobProto()
    try:
        bp.ParseFromString(buf)
        arr = np.asarray(blobproto_to_array(bp), np.float32)
    except Exception as e:
        raise BadFileError(f"not a mean .binaryproto (BlobProto): {e}", path=path) from None
    if arr.size == 0:
        raise BadFileError("the mean .binaryproto holds no values", path=path)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise BadFileError(f"the mean has shape {arr.shape}; expected 1 x C x H x W", path=path)
    return np.ascontiguousarray(arr)


__all__ = ["datum_to_array", "array_to_datum", "decode_image", "read_image", "read_mean_file",
           "decoder_name", "COLOR", "GRAY", "NATIVE"]
