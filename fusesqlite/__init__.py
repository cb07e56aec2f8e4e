"""fusesqlite: SQLite databases on FUSE, with their pages in a transactional store."""

__version__ = "0.1.0"
