"""Workflow backends: the Flower-free ML of each phase (pretrain, adapt, synthesize, downstream).

Like the ``task.py`` of Flower's examples, a backend is plain torch/numpy code used from both sides: the server
asks it for the initial global model, a site's task (``client/site.py``) for the phase computations. Every
backend implements `Backend` (shared/backends/base.py) and registers itself by name; importing this package
registers the built-in ones (``c2l``, ``toy``).
"""

from shared.backends import c2l, toy  # noqa: F401  (registers the built-in backends)
from shared.backends.base import Backend, backend_names, create_backend, register_backend

__all__ = ["Backend", "backend_names", "create_backend", "register_backend"]
