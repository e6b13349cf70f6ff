"""Flower-free pieces of the federation: update validation, checkpoints, site-side tasks, run reports.

Nothing here imports Flower, so tests and the benchmark drive it directly; `server/` and `client/` only
translate Flower messages to these calls.
"""
