"""Workflow backends: the Flower-free ML of each phase (pretrain, adapt, synthesize, downstream).

Like the ``task.py`` of Flower's examples, a backend is plain torch/numpy code used from both sides: the server
asks it for the initial global model, a site's task (``client/site.py``) for the phase computations.
"""
