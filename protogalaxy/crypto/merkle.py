"""Merkle trees, inclusion and consistency proofs as specified by RFC 9162, section 2.1
(the same trees as RFC 6962).

* leaf hash ``SHA-256(0x00 || data)``, node hash ``SHA-256(0x01 || left || right)``;
* ``MTH(D[n])`` splits at ``k``, the largest power of two smaller than ``n``;
* the empty tree's root is ``SHA-256("")``.

An odd node is never duplicated, so ``[a, b, c]`` and ``[a, b, c, c]`` have different
roots (the duplicated-leaf ambiguity of CVE-2012-2459 cannot arise).

Storage: ``levels[l][i]`` is the root of the perfect subtree over leaves
``[i * 2**l, (i + 1) * 2**l)``. Every subtree that the RFC recursion visits is a
right fold of at most ``log2(n)`` such perfect subtrees, so building costs exactly the
``2n - 1`` hashes the tree has, appending is amortized O(1), and any earlier root and
any proof come from O(log n) stored nodes without rehashing.

Verification follows RFC 9162 sections 2.1.3.2 and 2.1.4.2 and fails closed: it
returns ``None`` and raises a :class:`~protogalaxy.crypto.errors.ProofError`
subclass on any failure.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from protogalaxy.crypto._checks import check_bytes, check_u64, unhex
from protogalaxy.crypto.errors import MalformedProofError, RootMismatchError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "InclusionProof",
    "MerkleTree",
    "decode_consistency_proof",
    "encode_consistency_proof",
    "hash_children",
    "hash_leaf",
    "is_consistent",
    "is_included",
    "verify_consistency",
    "verify_inclusion",
    "verify_inclusion_hash",
]

HASH_SIZE: Final = 32
_sha256 = hashlib.sha256
_LEAF_PREFIX: Final = b"\x00"
_NODE_PREFIX: Final = b"\x01"
#: Root of the empty tree: SHA-256 of the empty string (RFC 9162, section 2.1.1).
EMPTY_ROOT: Final = _sha256(b"").digest()
_TREE_MAGIC: Final = b"PGMT\x01"
_PROOF_MAGIC: Final = b"PGIP\x01"
_CONS_MAGIC: Final = b"PGCP\x01"
_MAX_PATH: Final = 64


def hash_leaf(data: bytes) -> bytes:
    """RFC 9162 leaf hash: ``SHA-256(0x00 || data)``."""
    return _sha256(_LEAF_PREFIX + data).digest()


def hash_children(left: bytes, right: bytes) -> bytes:
    """RFC 9162 interior node hash: ``SHA-256(0x01 || left || right)``."""
    return _sha256(_NODE_PREFIX + left + right).digest()


def _check_size(name: str, value: object, *, minimum: int = 0) -> int:
    return check_u64(name, value, minimum=minimum)


def _check_hash(name: str, value: object) -> bytes:
    return check_bytes(name, value, HASH_SIZE)


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


@dataclass(frozen=True)
class InclusionProof:
    """An audit path (RFC 9162 section 2.1.3) for the leaf at ``leaf_index`` in the
    tree of ``tree_size`` leaves. ``path`` runs from the leaf's sibling up to the
    child of the root."""

    leaf_index: int
    tree_size: int
    path: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_size("leaf_index", self.leaf_index)
        _check_size("tree_size", self.tree_size, minimum=1)
        if self.leaf_index >= self.tree_size:
            raise ValueError(
                f"leaf_index {self.leaf_index} out of range "
                f"for tree_size {self.tree_size}"
            )
        if isinstance(self.path, (bytes, str)) or not isinstance(self.path, Sequence):
            raise TypeError(
                f"path must be a list of hashes, got {type(self.path).__name__}"
            )
        if len(self.path) > _MAX_PATH:
            raise ValueError(f"path has {len(self.path)} hashes, at most {_MAX_PATH}")
        object.__setattr__(
            self,
            "path",
            [_check_hash(f"path[{i}]", h) for i, h in enumerate(self.path)],
        )

    def to_bytes(self) -> bytes:
        """``b"PGIP\\x01" || u64 leaf_index || u64 tree_size || u8 len || hashes``."""
        return b"".join(
            [
                _PROOF_MAGIC,
                struct.pack("<QQB", self.leaf_index, self.tree_size, len(self.path)),
                *self.path,
            ]
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> InclusionProof:
        data = bytes(data)
        fixed = len(_PROOF_MAGIC) + 17
        if len(data) < fixed:
            raise ValueError(
                f"inclusion proof: {len(data)} bytes, at least {fixed} needed"
            )
        if data[: len(_PROOF_MAGIC)] != _PROOF_MAGIC:
            raise ValueError("inclusion proof: bad magic")
        index, size, count = struct.unpack_from("<QQB", data, len(_PROOF_MAGIC))
        if len(data) != fixed + HASH_SIZE * count:
            raise ValueError(
                f"inclusion proof: {len(data)} bytes, {fixed + HASH_SIZE * count} "
                f"expected for a path of {count} hashes"
            )
        path = [
            data[fixed + i * HASH_SIZE : fixed + (i + 1) * HASH_SIZE]
            for i in range(count)
        ]
        return cls(index, size, path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "leaf_index": self.leaf_index,
            "tree_size": self.tree_size,
            "path": [h.hex() for h in self.path],
        }

    @classmethod
    def from_dict(cls, obj: object) -> InclusionProof:
        if not isinstance(obj, dict):
            raise ValueError(
                f"inclusion proof: expected a JSON object, got {type(obj).__name__}"
            )
        if set(obj) != {"leaf_index", "tree_size", "path"}:
            raise ValueError(
                "inclusion proof: keys must be exactly leaf_index, tree_size, path; "
                f"got {sorted(obj)}"
            )
        path = obj["path"]
        if not isinstance(path, list):
            raise ValueError("inclusion proof: path must be a list of hex strings")
        try:
            return cls(
                obj["leaf_index"], obj["tree_size"], [unhex(h, "path") for h in path]
            )
        except TypeError as exc:
            raise ValueError(f"inclusion proof: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> InclusionProof:
        return cls.from_dict(_loads(text, "inclusion proof"))


def _loads(text: str | bytes, what: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}: malformed JSON ({exc})") from None


class MerkleTree:
    """An append-only RFC 9162 Merkle tree.

    Parameters
    ----------
    leaves
        The raw leaf data, in order. Each leaf is hashed as ``SHA-256(0x00 || data)``.

    Examples
    --------
    >>> tree = MerkleTree([b"a", b"b", b"c"])
    >>> proof = tree.inclusion_proof(2)
    >>> verify_inclusion(b"c", proof, tree.root)
    """

    __slots__ = ("_levels", "_root")

    def __init__(self, leaves: Iterable[bytes] = ()) -> None:
        if isinstance(leaves, (bytes, bytearray, str)):
            raise TypeError(
                "leaves must be an iterable of bytes, not a single bytes object"
            )
        sha = _sha256
        prefix = _LEAF_PREFIX
        try:
            hashes = [sha(prefix + data).digest() for data in leaves]
        except TypeError:
            bad = next(x for x in leaves if not isinstance(x, (bytes, bytearray)))
            raise TypeError(
                f"every leaf must be bytes, got {type(bad).__name__}"
            ) from None
        self._build(hashes)

    @classmethod
    def from_leaf_hashes(cls, hashes: Iterable[bytes]) -> MerkleTree:
        """A tree over already-hashed leaves (32-byte ``hash_leaf`` values)."""
        tree = cls.__new__(cls)
        tree._build([_check_hash(f"leaf hash {i}", h) for i, h in enumerate(hashes)])
        return tree

    def _build(self, level: list[bytes]) -> None:
        sha = _sha256
        node = _NODE_PREFIX
        levels = [level]
        while len(level) > 1:
            it = iter(level)
            level = [
                sha(node + left + right).digest()
                for left, right in zip(it, it, strict=False)
            ]
            levels.append(level)
        self._levels = levels
        self._root: bytes | None = None

    # -- size and hashes ---------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of leaves."""
        return len(self._levels[0])

    def __len__(self) -> int:
        return len(self._levels[0])

    @property
    def root(self) -> bytes:
        """The tree head ``MTH(D[size])``."""
        if self._root is None:
            self._root = self._range_hash(0, self.size)
        return self._root

    def leaf_hash(self, index: int) -> bytes:
        """The leaf hash at ``index``."""
        _check_size("index", index)
        if index >= self.size:
            raise IndexError(
                f"leaf index {index} out of range for tree of size {self.size}"
            )
        return self._levels[0][index]

    def root_at(self, size: int) -> bytes:
        """The root the tree had when it held its first ``size`` leaves."""
        self._check_tree_size(size, minimum=0)
        return self._range_hash(0, size)

    def append(self, data: bytes) -> int:
        """Append one leaf without rebuilding; return its index."""
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"leaf must be bytes, got {type(data).__name__}")
        return self._append_hash(hash_leaf(bytes(data)))

    def append_leaf_hash(self, leaf_hash: bytes) -> int:
        """Append one already-hashed leaf; return its index."""
        return self._append_hash(_check_hash("leaf_hash", leaf_hash))

    def _append_hash(self, h: bytes) -> int:
        levels = self._levels
        levels[0].append(h)
        index = len(levels[0]) - 1
        level = 0
        while len(levels[level]) % 2 == 0:
            lv = levels[level]
            if level + 1 == len(levels):
                levels.append([])
            levels[level + 1].append(hash_children(lv[-2], lv[-1]))
            level += 1
        self._root = None
        return index

    def _check_tree_size(self, size: int, *, minimum: int) -> int:
        _check_size("tree_size", size, minimum=minimum)
        if size > self.size:
            raise ValueError(f"tree_size {size} exceeds the tree's size {self.size}")
        return size

    def _range_hash(self, lo: int, hi: int) -> bytes:
        """``MTH(D[lo:hi])`` for a range that the RFC recursion visits (``lo`` is a
        multiple of a power of two at least ``hi - lo``): the right fold of the
        perfect subtrees that make it up, one per set bit of ``hi - lo``."""
        size = hi - lo
        if size == 0:
            return EMPTY_ROOT
        levels = self._levels
        parts = []
        pos = lo
        while size:
            level = size.bit_length() - 1
            parts.append(levels[level][pos >> level])
            pos += 1 << level
            size -= 1 << level
        h = parts.pop()
        sha = _sha256
        node = _NODE_PREFIX
        while parts:
            h = sha(node + parts.pop() + h).digest()
        return h

    def _path(self, level: int, index: int, n: int) -> list[bytes]:
        """The audit path of the perfect subtree ``levels[level][index]`` in the
        tree of the first ``n`` leaves, bottom up (RFC 9162's ``PATH`` when
        ``level`` is 0; the tail of ``PROOF`` otherwise).

        Below the level where the node's path and the right border part, every
        sibling is a stored perfect subtree; the sibling at that level may reach
        past ``n`` and is the one node that is hashed (a right fold of at most
        ``log2(n)`` stored subtrees); above it the path runs along the border,
        whose siblings are the stored subtrees to its left.
        """
        levels = self._levels
        last = (n - 1) >> level
        fork = (index ^ last).bit_length()  # levels below the border
        path = [levels[level + j][(index >> j) ^ 1] for j in range(fork - 1)]
        if fork:
            top = level + fork - 1
            sibling = (index >> (fork - 1)) ^ 1  # to the right: index < last
            if (sibling + 1) << top <= n:
                path.append(levels[top][sibling])
            else:
                path.append(self._range_hash(sibling << top, n))
        i = index >> fork
        lv = level + fork
        while i:
            if i & 1:
                path.append(levels[lv][i ^ 1])
            i >>= 1
            lv += 1
        return path

    # -- proofs ----------------------------------------------------------------

    def inclusion_proof(
        self, index: int, tree_size: int | None = None
    ) -> InclusionProof:
        """The audit path ``PATH(index, D[tree_size])`` of RFC 9162 section 2.1.3.1.

        ``tree_size`` defaults to the current size; any earlier size may be given.
        """
        n = (
            self.size
            if tree_size is None
            else self._check_tree_size(tree_size, minimum=1)
        )
        _check_size("index", index)
        if index >= n:
            raise ValueError(f"leaf index {index} out of range for tree_size {n}")
        path = self._path(0, index, n) if n > 1 else []
        return InclusionProof(index, n, path)

    def inclusion_proofs(
        self, indices: Iterable[int], tree_size: int | None = None
    ) -> list[InclusionProof]:
        """Inclusion proofs for many leaves against the same tree size."""
        return [self.inclusion_proof(i, tree_size) for i in indices]

    def consistency_proof(
        self, old_size: int, new_size: int | None = None
    ) -> list[bytes]:
        """``PROOF(old_size, D[new_size])`` of RFC 9162 section 2.1.4.1.

        ``new_size`` defaults to the current size. ``old_size`` must be in
        ``[1, new_size]``; equal sizes give the empty proof.
        """
        n = (
            self.size
            if new_size is None
            else self._check_tree_size(new_size, minimum=1)
        )
        m = _check_size("old_size", old_size, minimum=1)
        if m > n:
            raise ValueError(f"old_size {m} exceeds new_size {n}")
        if m == n:
            return []
        # The largest perfect subtree that ends at m, then its audit path in the
        # new tree; the subtree itself leads unless the old tree is that subtree.
        level = (m & -m).bit_length() - 1
        index = (m - 1) >> level
        path = self._path(level, index, n)
        if index:
            path.insert(0, self._levels[level][index])
        return path

    # -- serialization -----------------------------------------------------------

    def to_bytes(self) -> bytes:
        """``b"PGMT\\x01" || u64 size || leaf hashes``; interior nodes are rebuilt."""
        return b"".join([_TREE_MAGIC, struct.pack("<Q", self.size), *self._levels[0]])

    @classmethod
    def from_bytes(cls, data: bytes) -> MerkleTree:
        data = bytes(data)
        head = len(_TREE_MAGIC) + 8
        if len(data) < head or data[: len(_TREE_MAGIC)] != _TREE_MAGIC:
            raise ValueError("merkle tree: bad magic or truncated header")
        (size,) = struct.unpack_from("<Q", data, len(_TREE_MAGIC))
        if len(data) != head + HASH_SIZE * size:
            raise ValueError(
                f"merkle tree: {len(data)} bytes, {head + HASH_SIZE * size} expected "
                f"for {size} leaves"
            )
        return cls.from_leaf_hashes(
            data[head + i * HASH_SIZE : head + (i + 1) * HASH_SIZE] for i in range(size)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "root": self.root.hex(),
            "leaf_hashes": [h.hex() for h in self._levels[0]],
        }

    @classmethod
    def from_dict(cls, obj: object) -> MerkleTree:
        if not isinstance(obj, dict) or set(obj) != {"size", "root", "leaf_hashes"}:
            raise ValueError(
                "merkle tree: expected an object with size, root, leaf_hashes"
            )
        hashes = obj["leaf_hashes"]
        if not isinstance(hashes, list) or obj["size"] != len(hashes):
            raise ValueError(
                "merkle tree: size does not match the number of leaf_hashes"
            )
        try:
            tree = cls.from_leaf_hashes(unhex(h, "leaf_hashes") for h in hashes)
        except TypeError as exc:
            raise ValueError(f"merkle tree: {exc}") from None
        if not hmac.compare_digest(tree.root, unhex(obj["root"], "root")):
            raise ValueError("merkle tree: root does not match the leaf hashes")
        return tree

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> MerkleTree:
        return cls.from_dict(_loads(text, "merkle tree"))

    def __repr__(self) -> str:
        return f"MerkleTree(size={self.size}, root={self.root.hex()})"


def encode_consistency_proof(proof: Sequence[bytes]) -> bytes:
    """``b"PGCP\\x01" || u8 count || hashes``."""
    hashes = [_check_hash(f"proof[{i}]", h) for i, h in enumerate(proof)]
    if len(hashes) > _MAX_PATH:
        raise ValueError(
            f"consistency proof has {len(hashes)} hashes, at most {_MAX_PATH}"
        )
    return b"".join([_CONS_MAGIC, bytes([len(hashes)]), *hashes])


def decode_consistency_proof(data: bytes) -> list[bytes]:
    data = bytes(data)
    head = len(_CONS_MAGIC) + 1
    if len(data) < head or data[: len(_CONS_MAGIC)] != _CONS_MAGIC:
        raise ValueError("consistency proof: bad magic or truncated header")
    count = data[len(_CONS_MAGIC)]
    if len(data) != head + HASH_SIZE * count:
        raise ValueError(
            f"consistency proof: {len(data)} bytes, "
            f"{head + HASH_SIZE * count} expected "
            f"for {count} hashes"
        )
    return [
        data[head + i * HASH_SIZE : head + (i + 1) * HASH_SIZE] for i in range(count)
    ]


# -- verification ------------------------------------------------------------------


def _proof_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise MalformedProofError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value < 1 << 64:
        raise MalformedProofError(f"{name} {value} out of range")
    return value


def _proof_root(name: str, value: object) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or len(value) != HASH_SIZE:
        raise MalformedProofError(f"{name} must be {HASH_SIZE} bytes")
    return bytes(value)


def _verify_path(
    leaf_hash: bytes, proof: InclusionProof, root: bytes, tree_size: int | None
) -> None:
    """The RFC 9162 2.1.3.2 walk from ``leaf_hash`` to ``root``: the hot path."""
    if not isinstance(proof, InclusionProof):
        raise MalformedProofError(
            f"expected an InclusionProof, got {type(proof).__name__}"
        )
    index = proof.leaf_index
    size = proof.tree_size
    path = proof.path
    if (
        type(index) is not int
        or type(size) is not int
        or not 0 <= index < size < 1 << 64
    ):
        raise MalformedProofError(
            f"leaf_index {index!r} must be an int below tree_size {size!r}"
        )
    if tree_size is not None and tree_size != size:
        raise MalformedProofError(
            f"proof is for tree_size {size}, the trusted tree_size is {tree_size}"
        )
    # Decompose as RFC 9162 walks it: `inner` levels below the point where the leaf's
    # path meets the tree's right border, then left siblings only.
    inner = (index ^ (size - 1)).bit_length()
    if len(path) != inner + (index >> inner).bit_count():
        raise MalformedProofError(
            f"path has {len(path)} hashes; leaf {index} of a {size}-leaf tree needs "
            f"{inner + (index >> inner).bit_count()}"
        )
    try:
        whole = len(b"".join(path))
    except TypeError:
        whole = -1
    if whole != HASH_SIZE * len(path):
        raise MalformedProofError(f"every path element must be a {HASH_SIZE}-byte hash")
    if not isinstance(root, (bytes, bytearray)) or len(root) != HASH_SIZE:
        raise MalformedProofError(f"root must be {HASH_SIZE} bytes")
    sha = _sha256
    node = _NODE_PREFIX
    h = leaf_hash
    for i in range(inner):
        if (index >> i) & 1:
            h = sha(node + path[i] + h).digest()
        else:
            h = sha(node + h + path[i]).digest()
    for p in path[inner:]:
        h = sha(node + p + h).digest()
    if not hmac.compare_digest(h, root):
        raise RootMismatchError(
            f"inclusion proof for leaf {index} of {size} leads to a different root"
        )


def verify_inclusion_hash(
    leaf_hash: bytes,
    proof: InclusionProof,
    root: bytes,
    *,
    tree_size: int | None = None,
) -> None:
    """:func:`verify_inclusion` for an already-hashed leaf (``hash_leaf(data)``)."""
    _verify_path(_proof_root("leaf_hash", leaf_hash), proof, root, tree_size)


def verify_inclusion(
    leaf_data: bytes,
    proof: InclusionProof,
    root: bytes,
    *,
    tree_size: int | None = None,
) -> None:
    """Verify that ``leaf_data`` is leaf ``proof.leaf_index`` of the tree with ``root``
    (RFC 9162 section 2.1.3.2).

    Parameters
    ----------
    leaf_data
        The raw leaf data (hashed here as ``SHA-256(0x00 || leaf_data)``).
    proof
        The inclusion proof.
    root
        The trusted root hash.
    tree_size
        The trusted tree size, from signed data. An inclusion proof does not
        authenticate the size on its own (a leaf can hash the same way in trees of
        several sizes), so a proof that claims another size is rejected.

    Raises
    ------
    MalformedProofError
        Index or size out of range, or a path of the wrong length or element size.
    RootMismatchError
        The path leads to a different root.
    """
    if not isinstance(leaf_data, (bytes, bytearray)):
        raise MalformedProofError(
            f"leaf_data must be bytes, got {type(leaf_data).__name__}"
        )
    _verify_path(_sha256(_LEAF_PREFIX + leaf_data).digest(), proof, root, tree_size)


def verify_consistency(
    old_size: int,
    new_size: int,
    old_root: bytes,
    new_root: bytes,
    proof: Sequence[bytes],
) -> None:
    """Verify that the tree of ``new_size`` leaves with ``new_root`` extends the tree
    of ``old_size`` leaves with ``old_root`` (RFC 9162 section 2.1.4.2).

    Raises
    ------
    MalformedProofError
        ``old_size`` is 0 or exceeds ``new_size``, equal sizes with a non-empty
        proof, or a proof of the wrong length or element size.
    RootMismatchError
        The proof leads to roots other than ``old_root`` and ``new_root``.
    """
    first = _proof_int("old_size", old_size)
    second = _proof_int("new_size", new_size)
    old_root = _proof_root("old_root", old_root)
    new_root = _proof_root("new_root", new_root)
    if isinstance(proof, (bytes, str)) or not isinstance(proof, Sequence):
        raise MalformedProofError("proof must be a sequence of hashes")
    for i, c in enumerate(proof):
        if not isinstance(c, bytes) or len(c) != HASH_SIZE:
            raise MalformedProofError(f"proof[{i}] is not a {HASH_SIZE}-byte hash")
    if first == 0:
        raise MalformedProofError("old_size 0: there is nothing to prove consistent")
    if first > second:
        raise MalformedProofError(f"old_size {first} exceeds new_size {second}")
    if first == second:
        if proof:
            raise MalformedProofError("equal sizes need an empty proof")
        if not hmac.compare_digest(old_root, new_root):
            raise RootMismatchError("equal sizes but different roots")
        return
    if not proof:
        raise MalformedProofError(f"empty proof for sizes {first} < {second}")
    path = list(proof)
    if (
        first & (first - 1) == 0
    ):  # a power of two: the old root is a node of the new tree
        path.insert(0, old_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise MalformedProofError("consistency proof has too many hashes")
        if fn & 1 or fn == sn:
            fr = hash_children(c, fr)
            sr = hash_children(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = hash_children(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise MalformedProofError("consistency proof has too few hashes")
    if not hmac.compare_digest(fr, old_root):
        raise RootMismatchError(
            f"consistency proof does not lead to the old root ({first})"
        )
    if not hmac.compare_digest(sr, new_root):
        raise RootMismatchError(
            f"consistency proof does not lead to the new root ({second})"
        )


def is_included(leaf_data: bytes, proof: InclusionProof, root: bytes) -> bool:
    """Boolean wrapper of :func:`verify_inclusion`."""
    try:
        verify_inclusion(leaf_data, proof, root)
    except MalformedProofError:
        return False
    except RootMismatchError:
        return False
    return True


def is_consistent(
    old_size: int,
    new_size: int,
    old_root: bytes,
    new_root: bytes,
    proof: Sequence[bytes],
) -> bool:
    """Boolean wrapper of :func:`verify_consistency`."""
    try:
        verify_consistency(old_size, new_size, old_root, new_root, proof)
    except MalformedProofError:
        return False
    except RootMismatchError:
        return False
    return True
