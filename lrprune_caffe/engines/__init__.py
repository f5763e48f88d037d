"""Running nets: onnxruntime or OpenCV (``runtime.py``), latency (``bench.py``), accuracy
(``evaluate.py``), output comparison (``compare.py``)."""
