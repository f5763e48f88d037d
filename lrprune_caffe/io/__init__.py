"""Files in and out: prototxt and caffemodel (``caffe.py``), the fast blob codec (``wire.py``),
a net's output folder (``output.py``), training nets (``train_net.py``), .npz inputs and labels (``inputs.py``)."""
