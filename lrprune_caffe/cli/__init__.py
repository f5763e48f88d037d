"""The ``lrprune-caffe`` command line: argument parsing and printing only; the work is done by the API."""

from .main import main  # noqa: F401
