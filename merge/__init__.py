"""merge: model merging and task-vector arithmetic.

    import merge
    src = merge.open_checkpoint("model/")          # lazy: headers only
    merge.merge_expression("base + 0.7 * (math - base)", {"base": "b/", "math": "m/"}, "out/")
"""

__version__ = "0.1.0"
