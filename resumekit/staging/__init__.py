"""Copies of live tensors for asynchronous saves (internal).

``buffers`` (copy and overlap stagers, budgets, reused buffers), ``guards`` (wait for a tensor's copy
before its first in-place change), ``cuda`` (pinned buffers, side-stream copies ordered by events),
``background`` (the one save in flight and its writer thread). Internal: the public API is
``resumekit.__all__``.
"""
