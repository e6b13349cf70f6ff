"""Experiment harness: does central-to-local synthesis help data-limited sites (local vs federated vs pooled)?

Modules: ``config`` (typed CONFIG.toml), ``planner`` (the cell grid), ``runner`` (resumable execution),
``data`` (stores split by section), ``arms`` (the three arms), ``report`` (results.json, report.md, PNGs).
It lives on the server side because the federated arm drives the server's Workflow; the sites' ClientApp is
loaded by its component reference (``server.components``), never imported. This package imports nothing heavy.
"""
