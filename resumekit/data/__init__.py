"""Sample order and position for exact mid-epoch resume (internal), behind ``sampler`` and ``loader``.

``epoch_order`` (the per-epoch order and its partition across ranks), ``permutation`` (the keyed
random-access permutation), ``sampler_record`` (the validated saved position), ``loaderwatch`` (how a
bare ``DataLoader`` is driving a sampler: prefetch and base-seed draws). Internal: the public API is
``resumekit.__all__``.
"""
