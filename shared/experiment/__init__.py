"""Experiment harness: does central-to-local synthesis help data-limited sites (local vs federated vs pooled)?

Modules: ``config`` (typed CONFIG.toml), ``planner`` (the cell grid), ``runner`` (resumable execution),
``data`` (stores split by section), ``arms`` (the three arms), ``report`` (results.json, report.md, PNGs).
Import the submodules directly; this package imports nothing heavy.
"""
