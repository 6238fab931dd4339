"""The on-storage format (internal): what a checkpoint's bytes mean, independent of where they lie.

``manifest`` (the manifest record, step names and layout), ``codec`` (a state dict to tensors + a JSON
skeleton and back, without pickle), ``tensorfile`` (safetensors files: headers, positional reads,
crc32c while reading), ``strict_json`` (accepts exactly the JSON resumekit writes, refuses the rest).
Nothing here opens storage or touches a live object. Internal: the public API is ``resumekit.__all__``.
"""
