"""Memory planning: per-GPU memory of an ADM run from formulas (``plan.py``), the exact parameter
counts they need (``counts.py``, on the ``meta`` device), the command (``command.py``), and the
measurement the formulas are tested against (``measure.py``)."""
