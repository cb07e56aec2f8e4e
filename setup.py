"""Builds fusesqlite's three C modules; everything else is in pyproject.toml.

``fusesqlite._fuse_init`` (fuse_caps.py says why) needs libfuse3's headers, as
pyfuse3 does (3.14 and 3.17 build it; it engages only with the libfuse version
whose headers it was built with, docs/portability.md); it does not link libfuse3
(it finds the copy pyfuse3 loaded).
``fusesqlite._blocks`` (pages.decode_run says why) needs liblz4 and xxhash's
header.
``fusesqlite._journal`` (its comment says why) needs nothing but Python's headers.
"""
import subprocess

from setuptools import Extension, setup


def fuse3_cflags() -> list[str]:
    try:
        out = subprocess.run(["pkg-config", "--cflags", "fuse3"], capture_output=True, text=True, check=True)
        return out.stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return ["-I/usr/include/fuse3"]


setup(ext_modules=[
    Extension("fusesqlite._fuse_init", ["fusesqlite/_fuse_init.c"], extra_compile_args=fuse3_cflags()),
    # read-ahead's block decoding without the GIL (pages.decode_run): liblz4-dev, libxxhash-dev
    Extension("fusesqlite._journal", ["fusesqlite/_journal.c"], extra_compile_args=["-O2"]),
    Extension("fusesqlite._blocks", ["fusesqlite/_blocks.c"], libraries=["lz4"], extra_compile_args=["-O2"]),
])
