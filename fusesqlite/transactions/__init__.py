"""Overlays of uncommitted blocks, and the commit points that publish them.

Each stored file being written on this mount has a ``FileState``: the blocks
written since its last commit (its overlay), its pending size and mtime. Reads
see the overlay first, as a page cache would. ``Transactions.commit`` turns an
overlay into one store transaction (one new volume version); if the store
refuses it, the file reverts to its last committed state, so a failed commit
never leaves anything half-written. Deciding *when* to commit (journal deleted,
fsync, close) is the file-system layer's job; this module only knows how.
"""
from __future__ import annotations

from fusesqlite.transactions.base import BlockCorrupt
from fusesqlite.transactions.commits import Transactions

__all__ = ["BlockCorrupt", "Transactions"]
