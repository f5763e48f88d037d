"""Caffe files in and out: prototxt and caffemodel (``caffe.py``), the fast blob codec (``wire.py``)."""
