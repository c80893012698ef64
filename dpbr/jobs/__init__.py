"""Jobs: one command's work from a spec to its output files (``dpbr train``, ``vn``, ``reconstruct``).

The command line (:mod:`dpbr.cli`) parses options into specs and calls a job; a job checks what the
user can get wrong, sets up the process (:mod:`dpbr.jobs.common`: device, torch threads, seeding,
data and model), runs the libraries (:mod:`dpbr.simulation`, :mod:`dpbr.vn`, :mod:`dpbr.inversion`)
and writes its files atomically with their metadata. The libraries never import a job.

Modules
-------
:mod:`~dpbr.jobs.common`       device, torch threads (set and restored), seeding, data and model, metadata
:mod:`~dpbr.jobs.train`        ``dpbr train`` / ``train-many``: simulated cells → one Parquet each (+ checkpoints)
:mod:`~dpbr.jobs.bundles`      seed lists, ``train-many`` cell files, the workflow's bundles (no torch)
:mod:`~dpbr.jobs.vn`           ``dpbr vn``: cells × checkpoints → Parquet (+ minimal-b and η tables)
:mod:`~dpbr.jobs.reconstruct`  ``dpbr reconstruct``: one gradient-inversion job → Parquet + PNG
:mod:`~dpbr.jobs.checkpoints`  the checkpoint format of ``dpbr train``: writer, checksum, run id, loader
:mod:`~dpbr.jobs.data`         ``dpbr data fetch``: download or import, verify and cache a dataset

Importing this package imports no torch: the command line imports a job only once its options are checked.
"""
