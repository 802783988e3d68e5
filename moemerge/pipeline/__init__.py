"""Compositions that need both stages: stage 1 as a recipe asks for it, and `moemerge run`.

    stage1.py   `merge_checkpoints`: a recipe's stage 1, per-tensor (moemerge/merge) or `regmean`
    regmean.py  stage-1 `regmean`: a per-tensor merge of the rest, then the calibration walk
    run.py      `moemerge run`: stage 1 -> stage 2 -> diagnose

These sit above `merge/` and `calibrate/`, which never import each other (docs/LAYOUT.md).
"""
