"""ONNX out: our exporter on onnx.helper (``onnx.py``) and sparse initializers / CSR sizes (``sparse.py``)."""
