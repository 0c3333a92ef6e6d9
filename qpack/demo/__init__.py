"""The seed experiment as one command: ``qpack demo``.

Trains the seed CNN (and, with ``--model``, LeNet-300-100 and LeNet-5 as in Deep
Compression) on MNIST (or, with no MNIST at hand, on scikit-learn's handwritten digits),
packs it into ``.qpk`` files with several quantization settings, pruning and trained
quantization (:mod:`qpack.finetune`), loads each file back, evaluates it and reports file
sizes and accuracies (see ``/work/shared/seed-experiment.md`` for the experiment it
reproduces).

Modules:

- :mod:`qpack.demo.mnist`: IDX reader, MNIST sources (folder, cache, download) and the
  scikit-learn digits fallback.
- :mod:`qpack.demo.net`: the networks: :class:`~qpack.demo.net.SeedNet`,
  :class:`~qpack.demo.net.LeNet300`, :class:`~qpack.demo.net.LeNet5`.
- :mod:`qpack.demo.train`: training, evaluation, retraining, and the batches given to
  :func:`qpack.finetune.finetune`.
- :mod:`qpack.demo.run`: the variants, the report and the plots.
- :mod:`qpack.demo.cli`: ``configure_parser`` and ``run`` for the ``demo`` subcommand.

Nothing here is imported by ``import qpack``; importing this package imports nothing heavy.
"""

from __future__ import annotations

__all__: list[str] = []
