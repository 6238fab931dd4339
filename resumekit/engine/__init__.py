"""Save and restore (internal): entries, plans, reading, applying, and the collectives between ranks.

Restore: ``live`` (the user's objects as a restore sees them) -> ``plan.plan_step`` (pure: which files)
-> ``reader`` (read facts) -> ``plan.plan_load`` (pure: every refusal) -> ``reader`` (values) ->
``apply`` (load into live objects, RNG last); ``restore.read_newest`` walks the candidates with
fallback and ``collectives`` makes every rank agree. Save: ``entries`` -> ``save`` (snapshot, agree,
write, commit). Also ``keys``/``shapes``/``partial`` (canonical keys, shape checks, ``only=``),
``environment`` and ``drift_rules`` (what drift is recorded and how it is judged), ``readback``
(``verify_after_save``). Internal: the public API is ``resumekit.__all__``.
"""
