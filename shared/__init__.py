"""fedst shared code: data model, patch store, C2L-ST models and the downstream suite.

Nothing in this package imports Flower, so sites, tests and the federation all call it directly.
Heavy libraries (torch, openslide, scanpy) are imported inside functions to keep start-up fast.
"""

__version__ = "0.1.0"
