"""RFC 9162 Merkle trees: known answers, corrupted proofs, properties."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protogalaxy.crypto.errors import MalformedProofError, ProofError, RootMismatchError
from protogalaxy.crypto.merkle import (
    EMPTY_ROOT,
    InclusionProof,
    MerkleTree,
    decode_consistency_proof,
    encode_consistency_proof,
    is_consistent,
    is_included,
    verify_consistency,
    verify_inclusion,
)


def sha(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def leaf(d: bytes) -> bytes:
    return sha(b"\x00" + d)


def node(a: bytes, b: bytes) -> bytes:
    return sha(b"\x01" + a + b)


def data(n: int) -> list[bytes]:
    return [f"leaf-{i}".encode() for i in range(n)]


# -- known answers derived by hand from the RFC text ------------------------------

# RFC 9162 section 2.1.5: a tree of seven leaves d0..d6.
#             hash
#            /    \
#           k      l
#          / \    / \
#         g   h  i   j
#        / \ / \ / \ |
#        a b c d e f d6
D = [bytes([0x40 + i]) * (i + 1) for i in range(7)]
a, b, c, d, e, f, j = (leaf(x) for x in D)
g, h, i_ = node(a, b), node(c, d), node(e, f)
k, l_ = node(g, h), node(i_, j)
ROOT7 = node(k, l_)


def test_rfc9162_example_roots() -> None:
    tree = MerkleTree(D)
    assert tree.root == ROOT7
    assert tree.root_at(3) == node(g, c)  # hash0 of the RFC example
    assert tree.root_at(4) == k  # hash1
    assert tree.root_at(6) == node(k, i_)  # hash2
    assert tree.root_at(1) == a
    assert tree.root_at(0) == EMPTY_ROOT == sha(b"")


@pytest.mark.parametrize(
    ("index", "path"),
    [(0, [b, h, l_]), (3, [c, g, l_]), (4, [f, j, k]), (6, [i_, k])],
)
def test_rfc9162_example_inclusion_proofs(index: int, path: list[bytes]) -> None:
    tree = MerkleTree(D)
    proof = tree.inclusion_proof(index)
    assert proof == InclusionProof(index, 7, path)
    verify_inclusion(D[index], proof, ROOT7)


@pytest.mark.parametrize(
    ("old", "proof"),
    [(3, [c, d, g, l_]), (4, [l_]), (6, [i_, j, k])],
)
def test_rfc9162_example_consistency_proofs(old: int, proof: list[bytes]) -> None:
    tree = MerkleTree(D)
    assert tree.consistency_proof(old) == proof
    verify_consistency(old, 7, tree.root_at(old), ROOT7, proof)


def test_certificate_transparency_reference_roots() -> None:
    # The eight-leaf vectors of the RFC 6962 reference implementation.
    leaves = [
        b"",
        b"\x00",
        b"\x10",
        b"\x20\x21",
        b"\x30\x31",
        b"\x40\x41\x42\x43",
        bytes(range(0x50, 0x58)),
        bytes(range(0x60, 0x70)),
    ]
    roots = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ]
    tree = MerkleTree(leaves)
    assert [tree.root_at(n).hex() for n in range(1, 9)] == roots


def test_empty_tree() -> None:
    tree = MerkleTree()
    assert tree.size == 0
    assert tree.root == hashlib.sha256(b"").digest()
    with pytest.raises(ValueError):
        tree.inclusion_proof(0)


def test_no_duplication_of_odd_nodes() -> None:
    # CVE-2012-2459: duplicating the last node makes [a,b,c] and [a,b,c,c] collide.
    assert (
        MerkleTree([b"a", b"b", b"c"]).root != MerkleTree([b"a", b"b", b"c", b"c"]).root
    )


def test_phantom_duplicated_leaf_is_rejected() -> None:
    abc = MerkleTree([b"a", b"b", b"c"])
    la, lb, lc = (leaf(x) for x in (b"a", b"b", b"c"))
    # The Bitcoin-style tree would have root H(H(a,b), H(c,c)); ours is H(H(a,b), c).
    # A proof for a phantom fourth leaf "c" must fail against the real root.
    for path in ([lc, node(la, lb)], [node(la, lb)], [lc]):
        with pytest.raises(ProofError):
            verify_inclusion(b"c", InclusionProof(3, 4, path), abc.root)
        with pytest.raises(ValueError, match="out of range"):  # index 3 of 3 leaves
            InclusionProof(3, 3, path)


def test_interior_node_cannot_pose_as_leaf() -> None:
    tree = MerkleTree(data(4))
    l0, l1 = tree.leaf_hash(0), tree.leaf_hash(1)
    fake = InclusionProof(0, 2, [node(tree.leaf_hash(2), tree.leaf_hash(3))])
    with pytest.raises(RootMismatchError):
        verify_inclusion(l0 + l1, fake, tree.root)


# -- every proof verifies -------------------------------------------------------


def test_every_proof_of_every_leaf_verifies_for_sizes_1_to_300() -> None:
    leaves = data(300)
    tree = MerkleTree()
    for n in range(1, 301):
        tree.append(leaves[n - 1])
        root = tree.root
        assert root == MerkleTree(leaves[:n]).root
        for idx in range(n):
            verify_inclusion(leaves[idx], tree.inclusion_proof(idx), root)


def test_proofs_against_earlier_sizes() -> None:
    leaves = data(70)
    tree = MerkleTree(leaves)
    for size in range(1, 71):
        old_root = MerkleTree(leaves[:size]).root
        assert tree.root_at(size) == old_root
        for idx in range(size):
            verify_inclusion(leaves[idx], tree.inclusion_proof(idx, size), old_root)


def test_consistency_between_every_pair_of_sizes_up_to_64() -> None:
    leaves = data(64)
    tree = MerkleTree(leaves)
    for new in range(1, 65):
        for old in range(1, new + 1):
            proof = tree.consistency_proof(old, new)
            verify_consistency(old, new, tree.root_at(old), tree.root_at(new), proof)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3000), st.data())
def test_consistency_property(new: int, draw: st.DataObject) -> None:
    old = draw.draw(st.integers(1, new))
    tree = MerkleTree(data(new))
    proof = tree.consistency_proof(old)
    verify_consistency(old, new, tree.root_at(old), tree.root, proof)
    if old < new:
        # A different old tree of the same size is not consistent with the new one.
        other = MerkleTree([*data(old - 1), b"other"]).root
        assert not is_consistent(old, new, other, tree.root, proof)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.data())
def test_any_single_byte_change_fails(n: int, draw: st.DataObject) -> None:
    leaves = data(n)
    tree = MerkleTree(leaves)
    idx = draw.draw(st.integers(0, n - 1))
    proof = tree.inclusion_proof(idx)
    blob = bytearray(leaves[idx] + b"".join(proof.path) + tree.root)
    pos = draw.draw(st.integers(0, len(blob) - 1))
    blob[pos] ^= draw.draw(st.integers(1, 255))
    ld = len(leaves[idx])
    new_leaf = bytes(blob[:ld])
    new_path = [
        bytes(blob[ld + 32 * i : ld + 32 * (i + 1)]) for i in range(len(proof.path))
    ]
    new_root = bytes(blob[-32:])
    changed = InclusionProof(idx, n, new_path)
    with pytest.raises(RootMismatchError):
        verify_inclusion(new_leaf, changed, new_root)


# -- deliberately corrupted proofs ----------------------------------------------


@pytest.fixture(scope="module")
def tree13() -> MerkleTree:
    return MerkleTree(data(13))


def flip(h: bytes, bit: int = 0) -> bytes:
    return bytes([h[0] ^ (1 << bit)]) + h[1:]


@pytest.mark.parametrize("idx", range(13))
def test_corrupted_inclusion_proofs_rejected(tree13: MerkleTree, idx: int) -> None:
    leaves = data(13)
    proof = tree13.inclusion_proof(idx)
    root = tree13.root
    verify_inclusion(leaves[idx], proof, root)
    bad: list[InclusionProof] = []
    for k in range(len(proof.path)):  # a flipped bit in every path element
        path = list(proof.path)
        path[k] = flip(path[k], k % 8)
        bad.append(InclusionProof(idx, 13, path))
    bad.append(InclusionProof(idx, 13, proof.path[:-1]))  # truncated
    bad.append(InclusionProof(idx, 13, [*proof.path, proof.path[-1]]))  # extra node
    bad.append(InclusionProof(idx, 13, [*proof.path, root]))
    if len(proof.path) > 1:
        swapped = [proof.path[1], proof.path[0], *proof.path[2:]]
        bad.append(InclusionProof(idx, 13, swapped))
    for other in {idx - 1, idx + 1} & set(range(13)):  # wrong index
        bad.append(InclusionProof(other, 13, proof.path))
    for size in range(idx + 1, 40):  # a wrong size that changes the path's shape
        if size != 13 and len(MerkleTree(data(size)).inclusion_proof(idx).path) != len(
            proof.path
        ):
            bad.append(InclusionProof(idx, size, proof.path))
    for p in bad:
        assert not is_included(leaves[idx], p, root), p
        with pytest.raises(ProofError):
            verify_inclusion(leaves[idx], p, root)
    with pytest.raises(RootMismatchError):  # wrong root
        verify_inclusion(leaves[idx], proof, tree13.root_at(12))
    with pytest.raises(RootMismatchError):  # wrong leaf
        verify_inclusion(leaves[(idx + 1) % 13], proof, root)


def test_tree_size_is_not_authenticated_by_the_proof_alone(tree13: MerkleTree) -> None:
    # RFC 9162: index and size only fix the path's shape. Leaf 0 hashes the same way
    # in trees of 9..16 leaves, so a proof claiming size 12 still reaches the 13-leaf
    # root. Sizes must therefore come from signed data, passed as `tree_size`.
    proof = tree13.inclusion_proof(0)
    lying = InclusionProof(0, 12, proof.path)
    verify_inclusion(data(13)[0], lying, tree13.root)
    verify_inclusion(data(13)[0], proof, tree13.root, tree_size=13)
    with pytest.raises(MalformedProofError, match="trusted tree_size"):
        verify_inclusion(data(13)[0], lying, tree13.root, tree_size=13)


def test_inclusion_malformed_inputs(tree13: MerkleTree) -> None:
    proof = tree13.inclusion_proof(0)
    with pytest.raises(MalformedProofError):
        verify_inclusion(data(13)[0], proof, tree13.root[:31])
    with pytest.raises(MalformedProofError):
        verify_inclusion("leaf-0", proof, tree13.root)  # type: ignore[arg-type]
    with pytest.raises(MalformedProofError):
        verify_inclusion(data(13)[0], "proof", tree13.root)  # type: ignore[arg-type]
    proof.path[0] = b"short"  # mutated after construction: still fails closed
    with pytest.raises(MalformedProofError):
        verify_inclusion(data(13)[0], proof, tree13.root)


def test_corrupted_consistency_proofs_rejected() -> None:
    tree = MerkleTree(data(21))
    for old in (1, 2, 3, 5, 8, 13, 16, 20):
        proof = tree.consistency_proof(old)
        old_root, new_root = tree.root_at(old), tree.root
        verify_consistency(old, 21, old_root, new_root, proof)
        bad: list[tuple[int, int, bytes, bytes, list[bytes]]] = []
        for k in range(len(proof)):
            p = list(proof)
            p[k] = flip(p[k], 3)
            bad.append((old, 21, old_root, new_root, p))
        bad.append((old, 21, old_root, new_root, proof[:-1]))
        bad.append((old, 21, old_root, new_root, [*proof, proof[-1]]))
        bad.append((old, 21, new_root, old_root, proof))  # swapped roots
        bad.append((old, 21, flip(old_root), new_root, proof))
        bad.append((old, 21, old_root, flip(new_root), proof))
        bad.append((old + 1, 21, old_root, new_root, proof))  # wrong sizes
        for new in range(old, 40):  # a new size that changes the proof's shape
            if new != 21 and len(MerkleTree(data(new)).consistency_proof(old)) != len(
                proof
            ):
                bad.append((old, new, old_root, new_root, proof))
        for args in bad:
            with pytest.raises(ProofError):
                verify_consistency(*args)


def test_consistency_edge_cases() -> None:
    tree = MerkleTree(data(8))
    with pytest.raises(MalformedProofError, match="old_size 0"):
        verify_consistency(0, 8, EMPTY_ROOT, tree.root, [])
    with pytest.raises(ValueError):
        tree.consistency_proof(0)
    verify_consistency(8, 8, tree.root, tree.root, [])
    assert tree.consistency_proof(8) == []
    with pytest.raises(MalformedProofError, match="empty proof"):
        verify_consistency(8, 8, tree.root, tree.root, [tree.root])
    with pytest.raises(RootMismatchError):
        verify_consistency(8, 8, tree.root, tree.root_at(7), [])
    with pytest.raises(MalformedProofError):
        verify_consistency(9, 8, tree.root, tree.root, [tree.root])
    with pytest.raises(MalformedProofError):
        verify_consistency(3, 8, tree.root_at(3), tree.root, [])


# -- construction, append, serialization ----------------------------------------


def test_append_matches_bulk_build_and_keeps_old_roots() -> None:
    leaves = data(100)
    tree = MerkleTree(leaves[:37])
    for i, x in enumerate(leaves[37:], start=37):
        assert tree.append(x) == i
    assert tree.root == MerkleTree(leaves).root
    assert tree.size == len(tree) == 100
    for n in (1, 2, 37, 64, 99):
        assert tree.root_at(n) == MerkleTree(leaves[:n]).root
    assert tree.leaf_hash(5) == leaf(leaves[5])
    with pytest.raises(IndexError):
        tree.leaf_hash(100)
    with pytest.raises(ValueError):
        tree.root_at(101)


def test_from_leaf_hashes() -> None:
    leaves = data(9)
    tree = MerkleTree.from_leaf_hashes(leaf(x) for x in leaves)
    assert tree.root == MerkleTree(leaves).root
    with pytest.raises(ValueError, match="32 bytes"):
        MerkleTree.from_leaf_hashes([b"x" * 31])


def test_bad_leaves() -> None:
    with pytest.raises(TypeError):
        MerkleTree(b"abc")
    with pytest.raises(TypeError, match="bytes"):
        MerkleTree([b"ok", "not bytes"])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        MerkleTree().append("x")  # type: ignore[arg-type]


def test_tree_serialization_round_trip() -> None:
    tree = MerkleTree(data(27))
    assert MerkleTree.from_bytes(tree.to_bytes()).root == tree.root
    assert MerkleTree.from_json(tree.to_json()).root == tree.root
    assert MerkleTree.from_bytes(MerkleTree().to_bytes()).root == EMPTY_ROOT


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: b[:-1], "expected"),
        (lambda b: b + b"\x00", "expected"),
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b[:7], "truncated"),
    ],
)
def test_tree_from_bytes_malformed(mangle, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        MerkleTree.from_bytes(mangle(MerkleTree(data(5)).to_bytes()))


def test_tree_from_json_malformed() -> None:
    good = json.loads(MerkleTree(data(5)).to_json())
    with pytest.raises(ValueError, match="root does not match"):
        MerkleTree.from_dict({**good, "root": "00" * 32})
    with pytest.raises(ValueError, match="size"):
        MerkleTree.from_dict({**good, "size": 4})
    with pytest.raises(ValueError, match="hex"):
        MerkleTree.from_dict({**good, "leaf_hashes": ["zz"] * 5})
    with pytest.raises(ValueError, match="malformed JSON"):
        MerkleTree.from_json("{")


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 500), st.data())
def test_proof_serialization_round_trip(n: int, draw: st.DataObject) -> None:
    tree = MerkleTree(data(n))
    proof = tree.inclusion_proof(draw.draw(st.integers(0, n - 1)))
    assert InclusionProof.from_bytes(proof.to_bytes()) == proof
    assert InclusionProof.from_json(proof.to_json()) == proof
    cons = tree.consistency_proof(draw.draw(st.integers(1, n)))
    assert decode_consistency_proof(encode_consistency_proof(cons)) == cons


def test_proof_from_bytes_malformed() -> None:
    raw = MerkleTree(data(10)).inclusion_proof(3).to_bytes()
    for bad, message in [
        (raw[:-1], "expected"),
        (raw + b"\x00", "expected"),
        (raw[:10], "at least"),
        (b"XXXXX" + raw[5:], "magic"),
    ]:
        with pytest.raises(ValueError, match=message):
            InclusionProof.from_bytes(bad)
    with pytest.raises(ValueError, match="out of range"):
        InclusionProof.from_dict({"leaf_index": 5, "tree_size": 5, "path": []})
    with pytest.raises(ValueError, match="keys"):
        InclusionProof.from_dict({"leaf_index": 0, "tree_size": 1})
    with pytest.raises(ValueError, match="32 bytes"):
        InclusionProof.from_dict({"leaf_index": 0, "tree_size": 2, "path": ["00"]})
    with pytest.raises(ValueError, match="hex"):
        InclusionProof.from_dict({"leaf_index": 0, "tree_size": 2, "path": ["xyz"]})
    with pytest.raises(ValueError, match="int"):
        InclusionProof.from_dict({"leaf_index": "0", "tree_size": 2, "path": []})
    with pytest.raises(ValueError, match="expected"):
        decode_consistency_proof(encode_consistency_proof([b"\x00" * 32])[:-1])


def test_matches_pymerkle_reference() -> None:
    pymerkle = pytest.importorskip("pymerkle")
    ref = pymerkle.InmemoryTree(algorithm="sha256")
    leaves = data(77)
    for x in leaves:
        ref.append_entry(x)
    tree = MerkleTree(leaves)
    for n in (1, 2, 3, 31, 32, 33, 77):
        assert ref.get_root(n) == tree.root_at(n)


# -- the proofs are exactly the RFC's, not merely ones that verify -----------------


def _mth(leaves: list[bytes]) -> bytes:
    """MTH(D[n]) straight from RFC 9162 section 2.1.1."""
    n = len(leaves)
    if n == 0:
        return sha(b"")
    if n == 1:
        return leaf(leaves[0])
    k = 1 << ((n - 1).bit_length() - 1)
    return node(_mth(leaves[:k]), _mth(leaves[k:]))


def _rfc_path(m: int, leaves: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]) of RFC 9162 section 2.1.3.1."""
    n = len(leaves)
    if n == 1:
        return []
    k = 1 << ((n - 1).bit_length() - 1)
    if m < k:
        return [*_rfc_path(m, leaves[:k]), _mth(leaves[k:])]
    return [*_rfc_path(m - k, leaves[k:]), _mth(leaves[:k])]


def _rfc_subproof(m: int, leaves: list[bytes], complete: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b) of RFC 9162 section 2.1.4.1."""
    n = len(leaves)
    if m == n:
        return [] if complete else [_mth(leaves)]
    k = 1 << ((n - 1).bit_length() - 1)
    if m <= k:
        return [*_rfc_subproof(m, leaves[:k], complete), _mth(leaves[k:])]
    return [*_rfc_subproof(m - k, leaves[k:], False), _mth(leaves[:k])]


def test_proofs_equal_the_rfc_recursion_for_every_size_up_to_70() -> None:
    leaves = data(70)
    tree = MerkleTree(leaves)
    for new in range(1, 71):
        for old in range(1, new + 1):
            want = _rfc_subproof(old, leaves[:new], True) if old < new else []
            assert tree.consistency_proof(old, new) == want, (old, new)
        for idx in range(new):
            assert tree.inclusion_proof(idx, new).path == _rfc_path(
                idx, leaves[:new]
            ), (idx, new)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 5000), st.data())
def test_proofs_equal_the_rfc_recursion_in_larger_trees(
    size: int, draw: st.DataObject
) -> None:
    leaves = data(size)
    tree = MerkleTree(leaves)
    new = draw.draw(st.integers(1, size))
    old = draw.draw(st.integers(1, new))
    idx = draw.draw(st.integers(0, new - 1))
    want = _rfc_subproof(old, leaves[:new], True) if old < new else []
    assert tree.consistency_proof(old, new) == want
    assert tree.inclusion_proof(idx, new).path == _rfc_path(idx, leaves[:new])
