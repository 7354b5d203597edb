"""Byte I/O on any ``pyarrow.fs`` filesystem (a local path or a URI such as ``s3://bucket/run``):
resolve a path, read, write atomically, test existence. Everything in ``raysens.store`` goes
through these four functions. pyarrow only.
"""

from __future__ import annotations

import os
import posixpath

import pyarrow.fs as pafs


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or any URI pyarrow understands."""
    path = str(path)
    if "://" in path:
        fs, inner = pafs.FileSystem.from_uri(path)
        return fs, inner.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write atomically where the filesystem allows it (temp file + move)."""
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = path + ".tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound
