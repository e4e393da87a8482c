"""A layer's tree as bytes, kept in its index: what merging the layers of an image needs without reading them.

The form is JSON (zlib-compressed by the index): a list of inodes, the
root first; a hardlink is one inode named twice. Names and link targets
are kept as text with surrogate escapes (any bytes survive), xattr values
as base64. Loading checks every field: a damaged tree is refused, never
half read.
"""

from __future__ import annotations

import base64
import binascii
import json
import stat

from erofs_mount_core import ImageNode

from .entries import Tree, problem_of

_TEXT = ("utf-8", "surrogateescape")


def dump(tree: Tree) -> bytes:
    numbers: dict[int, int] = {id(tree.root): 0}
    order = [tree.root]
    for node in order:  # breadth first: every inode numbered as it is first met, with no recursion
        for child in node.children.values():
            if id(child) not in numbers:
                numbers[id(child)] = len(order)
                order.append(child)
    inodes = [[node.mode, node.uid, node.gid, node.mtime, node.mtime_nsec, node.size, node.data_offset,
               node.target.decode(*_TEXT), list(node.rdev),
               {k.decode(*_TEXT): base64.b64encode(v).decode() for k, v in node.xattrs.items()},
               [[name.decode(*_TEXT), numbers[id(child)]] for name, child in node.children.items()],
               int(tree.is_implicit(node))] for node in order]
    return json.dumps(inodes, separators=(",", ":")).encode()


def load(data: bytes, base: int = 0) -> Tree:
    """The tree, every file's ``data_offset`` moved by ``base`` (where its layer's stream starts in an image's
    backing); ValueError if ``data`` is not a whole tree of values an image can hold."""
    try:
        rows = json.loads(data)
        nodes = [ImageNode(mode=int(r[0]), uid=int(r[1]), gid=int(r[2]), mtime=int(r[3]), mtime_nsec=int(r[4]),
                           size=int(r[5]), data_offset=int(r[6]) if stat.S_ISREG(int(r[0])) else 0,
                           target=str(r[7]).encode(*_TEXT), rdev=(int(r[8][0]), int(r[8][1])),
                           xattrs={str(k).encode(*_TEXT): base64.b64decode(v, validate=True)
                                   for k, v in dict(r[9]).items()})
                 for r in rows]
        tree = Tree(nodes[0])
        placed: set[int] = set()
        for node, r in zip(nodes, rows, strict=True):
            for name, n in r[10]:
                if not stat.S_ISDIR(node.mode) or not 0 < int(n) < len(nodes):
                    raise ValueError("a child outside the tree")
                child = node.children[str(name).encode(*_TEXT)] = nodes[int(n)]
                if stat.S_ISDIR(child.mode):
                    if int(n) in placed:
                        raise ValueError("a directory in two places")  # (a cycle would need one)
                    placed.add(int(n))
            if r[11]:
                tree.implicit[id(node)] = node
            problem = problem_of(node)
            if problem is not None:
                raise ValueError(problem)
            node.data_offset += base if stat.S_ISREG(node.mode) else 0
    except (TypeError, KeyError, IndexError, AttributeError, binascii.Error, RecursionError, OverflowError,
            UnicodeError) as exc:
        raise ValueError(f"the tree is damaged ({exc})") from None
    if not stat.S_ISDIR(tree.root.mode):
        raise ValueError("the tree's root is not a directory")
    return tree


def moved(tree: Tree, base: int) -> Tree:
    """``tree`` itself, every file's ``data_offset`` moved by ``base`` (each inode once: hardlinks share one)."""
    if base:
        seen: set[int] = set()
        stack = [tree.root]
        while stack:
            for child in stack.pop().children.values():
                if id(child) in seen:
                    continue
                seen.add(id(child))
                if stat.S_ISREG(child.mode):
                    child.data_offset += base
                elif stat.S_ISDIR(child.mode):
                    stack.append(child)
    return tree
