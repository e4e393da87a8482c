"""An image's layers, merged into the one tree a container sees as its root filesystem.

Layers apply in order, each over what the ones before it made, with the
rules of the OCI image spec (and of overlayfs, which reads a single layer's
tree the same way, see ``tree``):

- an entry replaces whatever had its name below (a file over a directory,
  a symlink over a file), except that a directory over a directory merges
  with it, taking its attributes; a directory the layer never named (only
  a prefix of its entries) leaves the attributes below alone;
- a whiteout (a 0/0 character device) deletes its name below and is gone;
- an opaque directory (``trusted.overlay.opaque=y``) hides everything
  below it, and loses the mark;
- a hardlink stays one inode: deleting one of its names leaves the others.
"""

from __future__ import annotations

import stat

from erofs_mount_core import ImageNode

from .entries import IMPLICIT_DIR_MODE, Tree

OPAQUE_XATTR = b"trusted.overlay.opaque"


def merge(layers: list[Tree]) -> ImageNode:
    """The merged root; the layers' nodes are taken into it (merge trees loaded for this, not shared ones)."""
    root = ImageNode(mode=IMPLICIT_DIR_MODE)
    for layer in layers:
        _apply(root, layer.root, layer)
    return root


def is_whiteout(node: ImageNode) -> bool:
    return node.kind == stat.S_IFCHR and node.rdev == (0, 0)


def _is_opaque(node: ImageNode) -> bool:
    return node.xattrs.get(OPAQUE_XATTR) == b"y"


def _apply(lower: ImageNode, upper: ImageNode, layer: Tree) -> None:
    """Directory ``upper`` of ``layer`` over directory ``lower``, in place (with a stack, not recursion:
    a tree may be as deep as PATH_MAX allows)."""
    stack = [(lower, upper)]
    while stack:
        lower, upper = stack.pop()
        if not layer.is_implicit(upper):
            lower.mode, lower.uid, lower.gid = upper.mode, upper.uid, upper.gid
            lower.mtime, lower.mtime_nsec = upper.mtime, upper.mtime_nsec
            lower.xattrs = {k: v for k, v in upper.xattrs.items() if k != OPAQUE_XATTR}
        if _is_opaque(upper):
            lower.children = {}
        for name, node in upper.children.items():
            below = lower.children.get(name)
            if is_whiteout(node):
                lower.children.pop(name, None)
            elif node.kind == stat.S_IFDIR and below is not None and below.kind == stat.S_IFDIR:
                stack.append((below, node))
            elif node.kind == stat.S_IFDIR:
                fresh = lower.children[name] = ImageNode(mode=IMPLICIT_DIR_MODE)
                stack.append((fresh, node))  # whiteouts and opaque marks inside go too
            else:
                lower.children[name] = node
