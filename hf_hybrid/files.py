"""File modes of what hf_hybrid writes. Atomic writes go through a temporary file or directory, which
``tempfile`` creates private (0600 / 0700), and safetensors >= 0.8 writes its files 0600 too: once renamed
into place they would stay unreadable to other users or a serving container. ``honour_umask`` gives such a
tree the modes an ordinary ``open`` / ``mkdir`` would have (0666 / 0777 less the umask)."""

from __future__ import annotations

import os


def current_umask() -> int:
    """The process umask (read by setting it and restoring it at once: Python has no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> None:
    """Set ``path`` (a file, or a directory and everything under it) to the umask's default modes: files
    0666, directories 0777, less the umask. Symbolic links are left alone."""
    mask = current_umask()
    path = os.fspath(path)
    if os.path.islink(path):
        return
    if not os.path.isdir(path):
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o666 & ~mask)


__all__ = ["current_umask", "honour_umask"]
