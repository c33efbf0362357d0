"""NMS: the block fixed-point form gives exactly what the textbook one-box-at-a-time loop gives."""
import pytest
import torch

from tidyface.ops.nms import batched_nms, nms


def greedy(boxes, scores, thr, offset=0.0, mode="union"):
    """The definition, one box at a time (slow and obvious)."""
    order = sorted(range(len(boxes)), key=lambda i: -float(scores[i]))  # sorted() is stable
    b = boxes.double().tolist()
    kept = []
    for j in order:
        x1, y1, x2, y2 = b[j]
        aj = max(x2 - x1 + offset, 0) * max(y2 - y1 + offset, 0)
        drop = False
        for i in kept:
            u1, v1, u2, v2 = b[i]
            w = max(min(x2, u2) - max(x1, u1) + offset, 0)
            h = max(min(y2, v2) - max(y1, v1) + offset, 0)
            ai = max(u2 - u1 + offset, 0) * max(v2 - v1 + offset, 0)
            denom = min(ai, aj) if mode == "min" else ai + aj - w * h
            if w * h > thr * max(denom, 1e-12):
                drop = True
                break
        if not drop:
            kept.append(j)
    return kept


def clustered(n, seed, spread=40.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(max(n // 20, 1), 2, generator=g) * 600
    c = centres[torch.randint(len(centres), (n,), generator=g)] + torch.randn(n, 2, generator=g) * spread / 4
    wh = 20 + torch.rand(n, 2, generator=g) * spread
    return torch.cat([c - wh / 2, c + wh / 2], 1), torch.rand(n, generator=g)


@pytest.mark.parametrize("n", [1, 7, 255, 256, 257, 1000])
@pytest.mark.parametrize("thr,offset,mode", [(0.5, 0.0, "union"), (0.3, 0.0, "union"), (0.7, 1.0, "min")])
def test_equals_one_at_a_time_greedy(n, thr, offset, mode):
    boxes, scores = clustered(n, seed=n)
    assert nms(boxes, scores, thr, offset, mode).tolist() == greedy(boxes, scores, thr, offset, mode)


def test_long_suppression_chain_and_ties():
    """Boxes sliding one pixel at a time: each overlaps its neighbours, so who survives depends on
    a chain as long as the row; equal scores keep their input order."""
    x = torch.arange(300, dtype=torch.float32)
    boxes = torch.stack([x, torch.zeros(300), x + 10, torch.full((300,), 10.0)], 1)
    for scores in (torch.linspace(1, 0, 300), torch.ones(300), torch.linspace(0, 1, 300)):
        for thr in (0.5, 0.85):
            assert nms(boxes, scores, thr).tolist() == greedy(boxes, scores, thr)


def test_batched_never_suppresses_across_images():
    boxes, scores = clustered(400, seed=3)
    groups = torch.arange(400) % 3
    keep = batched_nms(boxes, scores, groups, 0.5)
    expect = []
    for g in range(3):
        idx = torch.nonzero(groups == g).flatten()
        expect += idx[greedy(boxes[idx], scores[idx], 0.5)].tolist()
    assert sorted(keep.tolist()) == sorted(expect)
    assert scores[keep].diff().le(0).all(), "by decreasing score"
    assert len(nms(torch.zeros(0, 4), torch.zeros(0), 0.5)) == 0
