"""Ray job entrypoints (``python -m jobs.infer``) and the ``qwen3vl-ray`` CLI.

Top of the dependency chain: jobs -> actors -> qwen3vl_ray; nothing imports jobs.
"""
