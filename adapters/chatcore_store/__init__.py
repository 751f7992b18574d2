"""History stores: the log that numbers, keeps and returns chat messages.

A store carries out the engine's storage effects (``LoadRoom``, ``Append``,
``LoadHistory``, ``SaveRoom``, ``SavePositions``) and answers with the
commands the engine expects back. :class:`MemoryStore` keeps everything in
this process; it answers at once, so single-process use feels synchronous.
"""

from ._base import HistoryStore, StorageEffect, is_storage_effect
from .memory import MemoryStore

__all__ = ["HistoryStore", "MemoryStore", "StorageEffect", "is_storage_effect"]
