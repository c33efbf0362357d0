"""Duplicate passes: aHash and sharpness against OpenCV, the hash pass's threshold/window rules,
best-face choice, the tiled embedding search against brute force, and the rules that keep
people apart: faces of one picture never in one set, hash links confirmed by embeddings."""
import cv2
import numpy as np
import pytest
import torch

from tidyface.tasks.dedup import (EMBEDDING_EPS, STRICTEST_HASH_CONFIRM, average_hash, dedup_log_rows,
                                  embedding_duplicates, frame_keys, hash_bits, hash_confirm_threshold, hash_duplicates,
                                  join_closest_first, sharpness)


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


# ----------------------------------------------------------------------------- rule 1: people apart

def _unit(rows):
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _turned(angle_deg):
    """A unit vector in the first plane at this angle: cosine distance 1 - cos(angle) to (1,0,..)."""
    a = np.radians(angle_deg)
    return [np.cos(a), np.sin(a), 0.0, 0.0]


def test_frame_keys_one_per_picture():
    keys = frame_keys(["v.mp4", "v.mp4", "v.mp4", "w.mp4", "a.jpg", "a.jpg", "b.jpg"], [3, 3, 4, 3, -1, -1, -1])
    assert keys[0] == keys[1] and keys[1] != keys[2] and keys[0] != keys[3]  # a frame, per video
    assert keys[4] == keys[5] and keys[4] != keys[6]  # a photo: its source
    assert frame_keys([], []).shape == (0,)


def test_faces_of_one_picture_are_never_duplicates():
    h = _packed(["0" * 64] * 3)  # identical hashes
    emb = _unit([[1, 0, 0, 0]] * 3)  # identical embeddings
    keys = np.array([7, 7, 8])  # faces 0 and 1 in one frame
    q = np.array([1.0, 2.0, 3.0])
    for res in [hash_duplicates(h, q, thr=0, window=w, keys=keys, embeddings=emb, confirm_thr=0.1) for w in (5, 0)] + \
            [embedding_duplicates(torch.from_numpy(emb), q, thr=0.1, keys=keys)]:
        # 0 and 1 apart; 2 joins the first of them (equal distances: the first link); both kept
        assert res.kept_of.tolist() == [2, 1, 2] and res.keep.tolist() == [False, True, True]
    assert hash_duplicates(h, thr=0).keep.sum() == 1  # without keys: one set, as before


def test_a_set_never_chains_two_faces_of_one_picture():
    # A and C of one frame; B (another frame) close to both: A-B at 0.005, B-C at 0.02. The
    # all-pairs search finds the chain and rebuilds it closest first: B joins A, C stays alone,
    # in any input order. The hash window links greedily in input order, so there B may join C
    # instead; either way A and C never share a set.
    emb = _unit([_turned(0), _turned(5.7), _turned(-11.5)])  # A, B, C
    keys, q = np.array([1, 2, 1]), np.array([1.0, 3.0, 2.0])
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        o = np.array(order)
        res = embedding_duplicates(torch.from_numpy(emb[o]), q[o], thr=0.05, keys=keys[o])
        got = {order[i]: order[k] for i, k in enumerate(res.kept_of)}  # back to A, B, C
        assert got == {0: 1, 1: 1, 2: 2}, order
        for window in (5, 0):
            hres = hash_duplicates(_packed(["0" * 64] * 3), q[o], thr=0, window=window, keys=keys[o],
                                   embeddings=emb[o], confirm_thr=0.05)
            a, c = int(np.flatnonzero(o == 0)[0]), int(np.flatnonzero(o == 2)[0])
            assert hres.kept_of[a] != hres.kept_of[c] and hres.keep.sum() == 2, (order, window)
            if window == 0:
                assert np.array_equal(hres.kept_of, res.kept_of), order


def test_join_closest_first_refuses_joins_of_one_picture():
    # links 0-1 (0.1), 1-2 (0.2), 2-3 (0.3); faces 0 and 2 share a picture
    labels = join_closest_first(4, np.array([2, 0, 1]), np.array([3, 1, 2]), np.array([0.3, 0.1, 0.2]),
                                np.array([5, 6, 5, 7]))
    assert labels.tolist() == [0, 0, 2, 2]  # 1-2 refused (0 and 2 would meet); 2-3 joins
    assert join_closest_first(3, np.array([0, 1]), np.array([1, 2]), np.array([0.1, 0.2]),
                              np.array([1, 2, 3])).tolist() == [0, 0, 0]


def test_each_hash_link_is_confirmed_by_the_embeddings():
    # A B C: all hashes within thr. A-B embeddings close (0.005), B-C and A-C far (>= 0.3):
    # only the confirmed link A-B forms a set; C is not merged through B
    h = _packed(["0" * 64, "1" + "0" * 63, "11" + "0" * 62])
    emb = _unit([_turned(0), _turned(5.7), _turned(50)])
    for window in (5, 0):
        res = hash_duplicates(h, np.array([2.0, 1.0, 3.0]), thr=2, window=window, embeddings=emb, confirm_thr=0.1)
        assert res.keep.tolist() == [True, False, True] and res.kept_of.tolist() == [0, 0, 2], window
    # confirm_thr -1: the hash alone decides, as before (one set, C kept as the best)
    assert hash_duplicates(h, np.array([2.0, 1.0, 3.0]), thr=2, confirm_thr=-1).keep.tolist() == [False, False, True]
    with pytest.raises(ValueError, match="embeddings"):
        hash_duplicates(h, thr=2, confirm_thr=0.1)


def test_a_refused_window_link_sends_the_face_to_the_all_pairs_stage():
    # P then Q1, Q2 with one hash: the window (size 1, holding P) links Q1 and Q2 to P, both
    # refused by the embeddings; the all-pairs stage then finds Q1 ~ Q2
    h = _packed(["0" * 64] * 3)
    emb = _unit([_turned(0), _turned(60), _turned(62)])
    res = hash_duplicates(h, np.array([1.0, 1.0, 2.0]), thr=0, window=1, embeddings=emb, confirm_thr=0.05)
    assert res.keep.tolist() == [True, False, True] and res.kept_of.tolist() == [0, 2, 2]


def test_embeddings_are_asked_for_hash_matched_faces_only():
    """The deferred-embedding contract: faces without any hash match are never asked for (their
    rows may stay NaN), every face with one is (window and all-pairs stages)."""
    rows = ["0" * 64, "0" * 64, "1" * 64, "1" * 32 + "0" * 32, "0" * 8 + "1" * 56, "1" * 32 + "0" * 32]
    full = _unit([_turned(0), _turned(1), _turned(90), _turned(45), _turned(120), _turned(46)])
    asked = np.zeros(len(rows), bool)

    def embeddings(needed):
        asked[needed] = True
        out = np.full_like(full, np.nan)
        out[asked] = full[asked]
        return out

    res = hash_duplicates(_packed(rows), thr=0, window=1, embeddings=embeddings, confirm_thr=0.05)
    assert asked.tolist() == [True, True, False, True, False, True]  # 0~1 (window), 3~5 (all pairs)
    assert res.keep.tolist() == [True, False, True, True, True, False]


def test_pipeline_dedup_fills_deferred_embeddings_to_confirm():
    from tidyface.tasks import pipeline as pl
    from tidyface.types import FaceTable

    full = _unit([_turned(0), _turned(3), _turned(70), _turned(0)])
    deferred = full.copy()
    deferred[[1, 2]] = np.nan  # as video2faces leaves the faces the hash window linked
    t = FaceTable.build(4, dim=4, name=["a", "b", "c", "d"], source=["v"] * 4, frame=[0, 1, 2, 2],
                        hash=_packed(["0" * 64] * 4).numpy(), quality=[4.0, 3.0, 2.0, 1.0], embeddings=deferred)
    calls = []

    def fill(table, needed):
        calls.append(needed.copy())
        todo = needed & np.isnan(table.embeddings).any(1)
        table.embeddings[todo] = full[todo]

    out = pl.dedup(t, hash_thr=0, enc_dup_thr=-1, fill_embeddings=fill)
    # b confirms (0.0014 from a), c is another person (0.66), d is of c's frame but a's twin
    assert out.keep.tolist() == [True, False, True, False]
    assert calls[0][[1, 2]].all() and not np.isnan(t.embeddings).any()
    assert [(r["name"], r["kept"]) for r in out.logs[1]] == [("b", "a"), ("d", "a")]
    # the hash alone (confirm_thr -1) merges c too; d still cannot join c's set (one frame)
    assert pl.dedup(t, hash_thr=0, confirm_thr=-1).keep.tolist() == [True, False, False, True]


def test_confirming_threshold_per_encoder():
    from tidyface.registry import TaskDefaults, get

    assert hash_confirm_threshold(get("mobilefacenet").spec) == 0.4
    assert hash_confirm_threshold(get("facenet_casia_tf").spec) == 0.25

    class Unmeasured:  # a plugin's encoder without one: the strictest (refusing only keeps a duplicate)
        defaults = TaskDefaults()

    assert hash_confirm_threshold(Unmeasured) == hash_confirm_threshold(None) == STRICTEST_HASH_CONFIRM
