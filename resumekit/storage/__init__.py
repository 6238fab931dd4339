"""Where checkpoints live (internal): the storage interface and its backends.

``local`` (the ``Storage`` interface, local disk with fsync and atomic rename, ``open_storage``),
``objectstore`` (fsspec backends: S3/GCS conditional-create commit), ``transfer`` (parallel, budgeted,
retried uploads and downloads), ``safe_open`` (no links, FIFOs or devices under a root), ``verify``
(the one check of a file against its manifest record), ``retention`` (which steps ``keep_last``
deletes). Internal: the public API is ``resumekit.__all__``.
"""
