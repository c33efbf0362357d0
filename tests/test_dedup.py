"""Duplicate passes: aHash and sharpness against OpenCV, the hash pass's threshold/window rules,
best-face choice, and the tiled embedding search against brute force."""
import cv2
import numpy as np
import pytest
import torch

from tidyface.tasks.dedup import (EMBEDDING_EPS, average_hash, dedup_log_rows, embedding_duplicates,
                                  hash_bits, hash_duplicates, sharpness)


def _crops(n, size=64, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8))


def _packed(rows):
    """list of 64-char '0'/'1' strings -> (N,) int64 packed hashes (MSB first)."""
    return torch.from_numpy(np.array([int(r, 2) for r in rows], dtype=np.uint64).view(np.int64))


def test_average_hash_matches_opencv_area_resize():
    crops = _crops(5)
    got = average_hash(crops, bits=True).numpy()
    for i, c in enumerate(crops.numpy()):
        grey = c.transpose(1, 2, 0).astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        small = cv2.resize(grey, (8, 8), interpolation=cv2.INTER_AREA).ravel()
        np.testing.assert_array_equal(got[i], small > small.mean())
    packed = average_hash(crops)
    assert packed.dtype == torch.int64 and packed.shape == (5,)
    assert torch.equal(hash_bits(packed), average_hash(crops, bits=True))  # pack/unpack round trip
    assert torch.equal(average_hash(crops.float() / 255), packed)  # float 0..1 input, same hash


def test_average_hash_bit_order():
    img = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    img[..., :8] = 200  # left half bright: every row 11110000, top-left pixel is the MSB
    assert average_hash(img).item() == np.array([0xF0F0F0F0F0F0F0F0], dtype=np.uint64).view(np.int64)[0]


def test_sharpness_is_opencv_laplacian_variance():
    crops = _crops(3, size=40)
    got = sharpness(crops).numpy()
    for i, c in enumerate(crops.numpy()):
        grey = c.transpose(1, 2, 0).astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        ref = cv2.Laplacian(grey, cv2.CV_64F).var()
        assert abs(got[i] - ref) / ref < 1e-5
    blurred = torch.from_numpy(np.stack([cv2.GaussianBlur(c.transpose(1, 2, 0), (7, 7), 2).transpose(2, 0, 1)
                                         for c in crops.numpy()]))
    assert (sharpness(blurred) < sharpness(crops) / 4).all()


def test_hash_threshold_minus_one_off_zero_identical_only():
    base = "01" * 32
    near = "11" + base[2:]  # 1 bit away
    h = _packed([base, base, near])
    off = hash_duplicates(h, thr=-1)
    assert off.keep.all() and off.groups == [] and "disabled" in off.note
    same = hash_duplicates(h, thr=0)
    assert same.keep.tolist() == [True, False, True]
    assert [g.tolist() for g in same.groups] == [[0, 1]] and same.distance.tolist() == [0, 0, 0]
    one = hash_duplicates(h, thr=1)
    assert one.keep.tolist() == [True, False, False] and one.distance.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="-1"):
        hash_duplicates(h, thr=-2)


def test_hash_window_against_kept_faces_then_global():
    # drift: a->b and b->c are 4 bits, a->c 8 bits
    a = "0" * 64
    b = "1" * 4 + "0" * 60
    c = "1" * 8 + "0" * 56
    # window stage: b joins a and leaves; c is compared with the kept a only (8 > 4): survives;
    # global stage compares a and c only -> two sets
    res = hash_duplicates(_packed([a, b, c]), thr=4, window=5)
    assert res.keep.tolist() == [True, False, True]
    # no window: all pairs, a-b-c chain into one set
    res0 = hash_duplicates(_packed([a, b, c]), thr=4, window=0)
    assert res0.keep.tolist() == [True, False, False] and res0.distance[2] == 8
    # A B A with window 1: the second A is not in the window (only B is), the global pass finds it
    x, y = "0" * 64, "1" * 64
    res1 = hash_duplicates(_packed([x, y, x]), thr=0, window=1)
    assert res1.keep.tolist() == [True, True, False] and res1.kept_of.tolist() == [0, 1, 0]


def test_best_quality_face_kept_not_first():
    h = _packed(["0" * 64] * 3 + ["1" * 64])
    res = hash_duplicates(h, quality=np.array([1.0, 5.0, 3.0, 0.1]), thr=0)
    assert res.keep.tolist() == [False, True, False, True]
    assert res.kept.tolist() == [1] and res.kept_of.tolist() == [1, 1, 1, 3]
    rows = dedup_log_rows(res, ["f0", "f1", "f2", "f3"])
    assert [(r["name"], r["kept"], r["set"]) for r in rows] == [("f0", "f1", 0), ("f2", "f1", 0)]
    # equal quality: the first seen wins
    assert hash_duplicates(h, quality=np.ones(4), thr=0).keep.tolist() == [True, False, False, True]


def _brute_components(x, thr):
    d = 1 - x @ x.T
    n = len(x)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(d <= thr, 1))):
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return np.array([find(i) for i in range(n)]), d


def test_blocked_embedding_search_equals_brute_force():
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(300, 16))
    x = centres[rng.integers(0, 300, 3000)] + 0.15 * rng.normal(size=(3000, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    thr = 0.05
    roots, d = _brute_components(x, thr + EMBEDDING_EPS)  # float64, Python union-find
    # no pair so close to the limit that float32 rounding (~1e-7 here) could flip it
    assert np.abs(d - thr - EMBEDDING_EPS).min() > 5e-6
    q = rng.random(3000)
    res = embedding_duplicates(torch.from_numpy(x).float(), q, thr=thr, block=512)
    _, first, inv = np.unique(res.kept_of, return_index=True, return_inverse=True)
    assert np.array_equal(first[inv], roots)  # same sets, both named by their smallest index
    assert len(res.groups) > 100 and (~res.keep).sum() > 500  # the data really has duplicates
    for g, k in zip(res.groups, res.kept):  # kept = best quality of its set
        assert k == g[np.argmax(q[g])]
    drop = ~res.keep
    np.testing.assert_allclose(res.distance[drop], d[np.flatnonzero(drop), res.kept_of[drop]], atol=1e-5)
    # one tile covering everything gives the same sets
    whole = embedding_duplicates(torch.from_numpy(x).float(), q, thr=thr, block=4096)
    assert np.array_equal(whole.keep, res.keep) and np.array_equal(whole.kept_of, res.kept_of)


def test_embedding_threshold_zero_is_identical_only():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 512)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    twin = x[0] * (1 + 1e-7)  # float noise
    tilt = x[0] + 0.05 * x[1]  # cosine distance ~1e-3
    emb = torch.from_numpy(np.stack([x[0], twin, tilt / np.linalg.norm(tilt), x[1], x[2]]))
    res = embedding_duplicates(emb, thr=0)
    assert res.keep.tolist() == [True, False, True, True, True] and res.distance[1] <= EMBEDDING_EPS
    assert embedding_duplicates(emb, thr=0.01).keep.tolist() == [True, False, False, True, True]
    assert embedding_duplicates(emb, thr=-1).keep.all()


@pytest.mark.parametrize("n", [0, 1, 2])
def test_few_faces(n):
    emb = torch.nn.functional.normalize(torch.ones(n, 8), dim=1)
    res = embedding_duplicates(emb, np.arange(n, dtype=float), thr=0.1)
    # identical faces: with two, the better one (index 1) is kept
    assert res.keep.tolist() == {0: [], 1: [True], 2: [False, True]}[n]
    assert res.kept.tolist() == ([1] if n == 2 else [])
    hres = hash_duplicates(average_hash(_crops(n)), np.ones(n), thr=5)
    assert len(hres) == n and hres.keep.sum() >= min(n, 1)
    assert len(average_hash(torch.zeros(0, 3, 32, 32, dtype=torch.uint8))) == 0
    assert sharpness(torch.zeros(0, 3, 32, 32)).shape == (0,)


def test_bad_embeddings_refused():
    good = torch.nn.functional.normalize(torch.ones(3, 4), dim=1)
    for bad, msg in [(good.clone().index_fill_(0, torch.tensor([1]), float("nan")), "NaN"),
                     (good.clone().index_fill_(0, torch.tensor([2]), 0.0), "all-zero"),
                     (good[0], r"\(N,D\)")]:
        with pytest.raises(ValueError, match=msg):
            embedding_duplicates(bad, thr=0.1)
