"""fusesqlite: SQLite databases on FUSE, with their pages in a transactional store."""

from fusesqlite import fuse_caps

__version__ = "0.1.0"

fuse_caps.load()  # before anything imports pyfuse3 (fuse_caps.py says why)
