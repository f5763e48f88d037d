"""Net in, net out, no files: ``compress`` (``compress.py``: the sequence; ``options.py``,
``ranks.py``, ``verify.py``, ``report.py`` typed rows and byte counts, ``markdown.py``) and the
fine-tuning schedules (``pipeline.py``). File-level wrappers are in :mod:`lrprune_caffe.api`."""
