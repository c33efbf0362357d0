"""Alignment core: Umeyama vs closed forms, templates, warps vs cv2.warpAffine, round trips."""
import math

import cv2
import numpy as np
import pytest
import torch

from tidyface.ops.align import (ARCFACE_112, FACE_SPAN, FFHQ_1024, PADDING_MODES, invert, natural_face_factor,
                                template_for, transform_points, umeyama, unwarp, warp)

CV_BORDER = {"constant": cv2.BORDER_CONSTANT, "replicate": cv2.BORDER_REPLICATE,
             "reflect": cv2.BORDER_REFLECT_101, "wrap": cv2.BORDER_WRAP}


def similarity(scale, angle_deg, tx, ty, mirror=False):
    a = math.radians(angle_deg)
    m = np.array([[scale * math.cos(a), -scale * math.sin(a), tx],
                  [scale * math.sin(a), scale * math.cos(a), ty], [0, 0, 1]])
    if mirror:
        m[:2, 0] *= -1
    return m


def apply(m, pts):
    return pts @ m[:2, :2].T + m[:2, 2]


def complex_ls_similarity(src, dst):
    """Optimal 2D similarity by complex least squares: dst ~ a*src + b (no reflection possible)."""
    zs, zd = src[:, 0] + 1j * src[:, 1], dst[:, 0] + 1j * dst[:, 1]
    zs_c, zd_c = zs - zs.mean(), zd - zd.mean()
    a = (np.conj(zs_c) * zd_c).sum() / (np.abs(zs_c) ** 2).sum()
    b = zd.mean() - a * zs.mean()
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag], [0, 0, 1]])


def smooth_image(h, w, channels=3, seed=0):
    """Natural-looking test picture: bicubic-upscaled noise, values well inside 0..255."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(20, 235, (max(h // 12, 2), max(w // 12, 2), channels)).astype(np.float32)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(big, 0, 255).reshape(h, w, channels)


def to_batch(img):
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()


# ---------------------------------------------------------------- Umeyama

@pytest.mark.parametrize("k", [2, 5])
def test_umeyama_recovers_known_similarity(k):
    rng = np.random.default_rng(k)
    src = rng.uniform(0, 500, (k, 2))
    m = similarity(0.37, 123.0, 41.5, -17.25)
    est = umeyama(torch.from_numpy(src)[None], torch.from_numpy(apply(m, src)))[0].numpy()
    assert np.abs(est - m).max() < 1e-10


def test_umeyama_matches_complex_least_squares_on_noisy_points():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 300, (8, 5, 2))
    mats = [similarity(rng.uniform(0.2, 3), rng.uniform(-180, 180), *rng.uniform(-50, 50, 2)) for _ in src]
    dst = np.stack([apply(m, s) for m, s in zip(mats, src)]) + rng.normal(0, 4.0, src.shape)
    est = umeyama(torch.from_numpy(src), torch.from_numpy(dst)).numpy()
    for e, s, d in zip(est, src, dst):
        assert np.abs(e - complex_ls_similarity(s, d)).max() < 1e-9


def test_umeyama_reflection_gives_best_proper_similarity():
    rng = np.random.default_rng(2)
    src = rng.uniform(0, 100, (5, 2))
    dst = apply(similarity(1.3, 20, 5, 7, mirror=True), src) + rng.normal(0, 0.5, (5, 2))
    # Without the sign fix, the orthogonal Procrustes solution here is a reflection:
    u, _, vt = np.linalg.svd((dst - dst.mean(0)).T @ (src - src.mean(0)))
    assert np.linalg.det(u @ vt) < 0
    est = umeyama(torch.from_numpy(src)[None], torch.from_numpy(dst))[0].numpy()
    assert np.linalg.det(est[:2, :2]) > 0
    assert np.abs(est - complex_ls_similarity(src, dst)).max() < 1e-9


def test_umeyama_affine_matches_lstsq():
    rng = np.random.default_rng(3)
    src = rng.uniform(0, 200, (6, 2))
    m = np.array([[1.2, 0.3, 10.0], [-0.4, 0.8, -5.0], [0, 0, 1]])  # with skew
    exact = umeyama(torch.from_numpy(src)[None], torch.from_numpy(apply(m, src)), allow_skew=True)[0]
    assert np.abs(exact.numpy() - m).max() < 1e-10
    dst = apply(m, src) + rng.normal(0, 2.0, src.shape)
    est = umeyama(torch.from_numpy(src)[None], torch.from_numpy(dst), allow_skew=True)[0].numpy()
    sol, *_ = np.linalg.lstsq(np.c_[src, np.ones(6)], dst, rcond=None)
    assert np.abs(est[:2] - sol.T).max() < 1e-9


@pytest.mark.parametrize("allow_skew", [False, True])
def test_umeyama_batched_equals_looped(allow_skew):
    rng = np.random.default_rng(4)
    src = torch.from_numpy(rng.uniform(0, 300, (7, 5, 2))).float()
    batched = umeyama(src, ARCFACE_112, allow_skew=allow_skew)
    assert batched.dtype == torch.float32 and batched.shape == (7, 3, 3)
    looped = torch.cat([umeyama(s[None], ARCFACE_112, allow_skew=allow_skew) for s in src])
    assert torch.equal(batched, looped)


def test_umeyama_degenerate_input_raises():
    pts = torch.rand(3, 5, 2, dtype=torch.float64) * 100
    pts[1] = 42.0  # one face whose landmarks all coincide
    with pytest.raises(ValueError, match=r"item\(s\) \[1\] all coincide"):
        umeyama(pts, ARCFACE_112)
    line = torch.stack([torch.arange(5.0), 2 * torch.arange(5.0) + 1], 1)[None].double()
    with pytest.raises(ValueError, match="collinear"):
        umeyama(line, ARCFACE_112, allow_skew=True)
    assert torch.isfinite(umeyama(line, ARCFACE_112)).all()  # a similarity is fine on a line
    with pytest.raises(ValueError, match="needs >= 3 points"):
        umeyama(pts[:, :2], ARCFACE_112[:2], allow_skew=True)
    with pytest.raises(ValueError, match="needs >= 2 points"):
        umeyama(pts[:, :1], ARCFACE_112[:1])


def test_points_through_matrix_and_back():
    rng = np.random.default_rng(5)
    mats = torch.from_numpy(np.stack([similarity(rng.uniform(0.1, 5), rng.uniform(-180, 180),
                                                 *rng.uniform(-900, 900, 2)) for _ in range(6)]))
    pts = torch.from_numpy(rng.uniform(-100, 4000, (6, 9, 2)))
    there = transform_points(pts, mats)
    assert torch.allclose(there, torch.from_numpy(np.stack([apply(m.numpy(), p.numpy())
                                                            for m, p in zip(mats, pts)])), atol=1e-9)
    assert (transform_points(there, invert(mats)) - pts).abs().max() < 1e-9
    assert (invert(mats) @ mats - torch.eye(3, dtype=torch.float64)).abs().max() < 1e-12


# ---------------------------------------------------------------- templates

def test_arcface_template_is_reproduced_exactly():
    assert torch.equal(template_for(112), ARCFACE_112)
    assert torch.equal(template_for((112, 112), face_factor=natural_face_factor()), ARCFACE_112)
    assert natural_face_factor() == pytest.approx(FACE_SPAN * (92.3655 - 51.5014) / 112)


@pytest.mark.parametrize("size,face_factor", [((224, 224), 0.5), ((96, 112), 0.3), ((300, 180), 0.8),
                                              ((512, 512), None)])
@pytest.mark.parametrize("kind", ["arcface", "ffhq"])
def test_template_face_factor_definition(kind, size, face_factor):
    pts = template_for(size, kind, face_factor)
    ff = natural_face_factor(kind) if face_factor is None else face_factor
    extent = FACE_SPAN * (pts.amax(0) - pts.amin(0)).max()
    assert float(extent / min(size)) == pytest.approx(ff, rel=1e-12)
    # Same shape as the base (a pure similarity, here a uniform scale + shift, maps one on the other).
    side = 1024 if kind == "ffhq" else 112
    base = template_for(side, kind)
    fit = umeyama(base[None], pts)[0]
    assert (transform_points(base[None], fit[None])[0] - pts).abs().max() < 1e-9
    assert abs(fit[0, 1]) < 1e-12 and fit[0, 0] > 0
    # The face keeps its place relative to the frame centre.
    centre_base = base.mean(0) - (side - 1) / 2
    centre_out = pts.mean(0) - (pts.new_tensor(size) - 1) / 2
    assert torch.allclose(centre_out, centre_base * fit[0, 0], atol=1e-9)


def ffhq_quad(face):
    """FFHQ's crop square (download_ffhq.py) from eye centres and mouth corners, as 4 corners."""
    eye_l, eye_r, mouth_l, mouth_r = face[0], face[1], face[3], face[4]
    eye_avg = (eye_l + eye_r) * 0.5
    eye_to_eye = eye_r - eye_l
    eye_to_mouth = (mouth_l + mouth_r) * 0.5 - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def test_ffhq_template_reproduces_ffhq_crop_for_the_mean_face():
    rng = np.random.default_rng(6)
    for _ in range(5):
        m = similarity(rng.uniform(1, 8), rng.uniform(-40, 40), *rng.uniform(0, 2000, 2))
        face = apply(m, ARCFACE_112.numpy())
        # FFHQ maps the quad's corners onto the output's pixel-area corners (PIL QUAD on quad+0.5).
        corners = np.array([[-0.5, -0.5], [-0.5, 1023.5], [1023.5, 1023.5], [1023.5, -0.5]])
        ffhq = umeyama(torch.from_numpy(ffhq_quad(face))[None], torch.from_numpy(corners))[0]
        ours = umeyama(torch.from_numpy(face)[None], FFHQ_1024)[0]
        assert (transform_points(torch.from_numpy(corners)[None], invert(ffhq)[None])
                - transform_points(torch.from_numpy(corners)[None], invert(ours)[None])).abs().max() < 1e-6
    # Sanity against the empirical FFHQ means facexlib/GFPGAN use (512 px): same layout.
    facexlib = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                         [201.26117, 371.41043], [313.08905, 371.15118]]) / 512
    assert np.abs(FFHQ_1024.numpy() / 1024 - facexlib).max() < 0.03


# ---------------------------------------------------------------- warps

@pytest.mark.parametrize("padding", PADDING_MODES)
def test_warp_matches_cv2_warpaffine(padding):
    img = smooth_image(123, 97)
    fill = (17.0, 50.0, 200.0)
    results = []
    # Zoomed out (the crop spans several copies of the image: borders repeat), rotated, zoomed in.
    for m in (similarity(0.45, 25, 40.3, -20.7), similarity(2.3, -110, 180.2, 260.9),
              np.array([[1.1, 0.25, -3.3], [-0.15, 0.9, 7.7], [0, 0, 1]])):
        for src, tol_mean, tol_max in ((img, 1e-3, 0.02), (img.round().astype(np.uint8), 0.01, 1.0 + 1e-6)):
            ref = cv2.warpAffine(src, m[:2], (150, 140), flags=cv2.INTER_LINEAR,
                                 borderMode=CV_BORDER[padding], borderValue=fill).astype(np.float32)
            out = warp(to_batch(src), torch.from_numpy(m)[None], None, (150, 140), padding=padding,
                       fill=fill)[0].permute(1, 2, 0).numpy()
            if src.dtype == np.uint8:
                out = out.round()  # OpenCV rounds uint8 output; it also interpolates in fixed point
            diff = np.abs(out - ref)
            results.append((src.dtype.name, float(diff.mean()), float(diff.max())))
            assert diff.mean() < tol_mean and diff.max() < tol_max, (padding, results[-1])
    print(padding, results)


def test_warp_batched_equals_looped_and_never_copies_wrong_image():
    imgs = torch.stack([to_batch(smooth_image(90, 120, seed=s))[0] for s in (1, 2)])
    rng = np.random.default_rng(7)
    mats = torch.from_numpy(np.stack([similarity(rng.uniform(0.5, 2), rng.uniform(-30, 30),
                                                 *rng.uniform(-20, 20, 2)) for _ in range(4)]))
    index = torch.tensor([1, 0, 1, 1])
    for padding in PADDING_MODES:
        batched = warp(imgs, mats, index, (64, 48), padding=padding, fill=3.0)
        looped = torch.cat([warp(imgs[i:i + 1], mats[n:n + 1], None, (64, 48), padding=padding, fill=3.0)
                            for n, i in enumerate(index.tolist())])
        assert batched.shape == (4, 3, 48, 64)
        assert (batched - looped).abs().max() < 1e-4
    assert warp(imgs, mats[:0], index[:0], (64, 48)).shape == (0, 3, 48, 64)
    ref = warp(imgs, mats, index, (64, 48))
    as_uint8 = warp(imgs.round().to(torch.uint8), mats, index, (64, 48))
    assert as_uint8.dtype == torch.float32
    assert torch.equal(as_uint8, warp(imgs.round(), mats, index, (64, 48)))
    as_half = warp(imgs.half(), mats, index, (64, 48))
    assert as_half.dtype == torch.float16 and (as_half.float() - ref).abs().max() < 0.5
    with pytest.raises(IndexError):
        warp(imgs, mats, torch.tensor([0, 1, 2, 0]), (64, 48))


def test_warp_unwarp_round_trip():
    img = to_batch(smooth_image(100, 140))
    # 90-degree rotation + integer shift: every sample lands on a pixel centre, so exact.
    lattice = torch.tensor([[[0.0, -1.0, 99.0], [1.0, 0.0, -10.0], [0, 0, 1]]])
    crop = warp(img, lattice, None, (100, 100))
    back, mask = unwarp(crop, lattice, (140, 100))
    assert mask.dtype == torch.bool and mask.sum() == 100 * 100
    assert (back - img)[mask.expand_as(back)].abs().max() < 1e-3  # float32 grid rounding
    assert (back[~mask.expand_as(back)] == 0).all()
    # General similarity (rotated, 2.5x zoom, crop inside the image): interpolated twice, so
    # close but not exact; compared away from the crop's outline.
    m = similarity(2.5, 33, 0, 0)
    m[:2, 2] = np.array([74.5, 59.5]) - m[:2, :2] @ np.array([69.5, 49.5])  # image centre -> crop centre
    m = torch.from_numpy(m)[None]
    crop = warp(img, m, None, (150, 120))
    back, mask = unwarp(crop, m, (140, 100))
    interior = torch.from_numpy(cv2.erode(mask[0, 0].numpy().astype(np.uint8), np.ones((5, 5))))
    diff = (back - img)[:, :, interior.bool()].abs()
    assert interior.sum() > 1500 and diff.mean() < 0.5 and diff.max() < 3, (diff.mean(), diff.max())


@pytest.mark.parametrize("size,face_factor", [(112, None), (224, None), ((96, 112), None), (256, 0.42),
                                              (160, 0.25), ((200, 160), 0.4)])
def test_synthetic_landmarks_land_on_template(size, face_factor):
    """Blobs drawn at known landmarks come out of warp() on the template points (pixel-centre check)."""
    face = apply(similarity(2.7, 17, 90.3, 20.8), ARCFACE_112.numpy())
    yy, xx = np.mgrid[0:420, 0:400].astype(np.float64)
    sigma = 5.0
    img = sum(255 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2)) for x, y in face)
    target = template_for(size, face_factor=face_factor)
    m = umeyama(torch.from_numpy(face)[None], target)
    w, h = (size, size) if isinstance(size, int) else size
    crop = warp(torch.from_numpy(img)[None, None].float(), m, None, (w, h))[0, 0].double().numpy()
    s = float(torch.linalg.det(m[0, :2, :2]).sqrt())
    radius = int(math.ceil(4 * sigma * s))
    errors = []
    for tx, ty in target.numpy():
        cx, cy = int(round(tx)), int(round(ty))
        assert radius <= cx < w - radius and radius <= cy < h - radius
        win = crop[cy - radius:cy + radius + 1, cx - radius:cx + radius + 1]
        wy, wx = np.mgrid[cy - radius:cy + radius + 1, cx - radius:cx + radius + 1]
        errors.append(math.hypot((win * wx).sum() / win.sum() - tx, (win * wy).sum() / win.sum() - ty))
    print(size, face_factor, f"max landmark error {max(errors):.4f} px")
    assert max(errors) < 0.1, errors  # a half-pixel convention slip would show as ~0.5


@pytest.mark.parametrize("padding", ["constant", "replicate"])
def test_uint8_frame_warps_only_its_footprint_with_the_same_result(padding):
    """An 8-bit single frame is converted to float only where crops read it; the crops equal
    those warped from the whole frame, also for crops hanging over the frame's edges."""
    rng = np.random.default_rng(3)
    frame = torch.from_numpy(rng.integers(0, 256, (1, 3, 480, 640), dtype=np.uint8))
    mats = torch.stack([torch.tensor(similarity(s, a, tx, ty), dtype=torch.float64) for s, a, tx, ty in
                        [(1.3, 10, -40, -30), (0.8, -20, -300, -200), (2.0, 5, -1200, -900), (1.0, 0, 0, 0)]])
    for m in (mats[:2], mats[2:3], mats):  # inside, over the bottom-right edge, and a wide footprint
        got = warp(frame, m, None, (96, 112), padding=padding)
        full = warp(frame.float(), m, None, (96, 112), padding=padding)
        # float32 grid coordinates differ by ~1e-4 px between the two frames of reference, which
        # is up to ~0.015 grey levels on random 8-bit noise
        assert (got - full).abs().max() < 0.05 and (got - full).abs().mean() < 5e-3  # a 0.5 px slip: ~40
