"""The Caffe schema: our caffe.proto, loaded from a serialized descriptor (``proto.py``)."""
