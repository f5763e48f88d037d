"""The net-in, net-out jobs: compress (``compress.py``), the fine-tuning schedules (``pipeline.py``),
reports (``report.py``)."""
