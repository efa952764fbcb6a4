"""Weight surgery: import dense transformers checkpoints (``import_dense``), upcycling, DSA conversion."""

from .import_dense import import_dense  # noqa: F401
