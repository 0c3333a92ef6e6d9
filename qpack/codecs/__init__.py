"""The encodings a tensor can be stored in, keyed by the name stored in the file.

Each codec module keeps its parameter choice, its encoder and its decoder side by side as
pure functions; the format layer only sees the registry below.
"""

from __future__ import annotations

from . import derived, kmeans, raw, uniform

__all__ = ["CODECS", "QUANTIZERS", "raw", "uniform", "kmeans", "derived"]

#: encoding name stored in the file -> codec module
CODECS = {"raw": raw, "uniform": uniform, "kmeans": kmeans, "derived": derived}
#: the encodings that store bit-packed indices
QUANTIZERS = {"uniform": uniform, "kmeans": kmeans}
