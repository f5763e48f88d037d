"""Datasets: npz files and image folders with Caffe-style preprocessing (``datasets.py``)."""
