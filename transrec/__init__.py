"""transrec: end-to-end pretraining of transferable, content-based sequential recommenders."""

__version__ = "0.1.0"
