"""Memory planning: per-GPU memory of an ADM run from formulas (``plan.py``), the exact parameter
counts they need (``counts.py``, on the ``meta`` device), each model family's per-block counts
(``terms.py``; ``cogvideox_terms.py``, ``sd3_terms.py``), the command (``command.py``), and the
measurement the formulas are tested against (``measure.py``)."""
