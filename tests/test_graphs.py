"""ops/graphs.py: CPU graphs compute what the eager forward computes, run only inside a stream,
give every call of a shape the same result whatever ran before, and give way to eager for
anything they cannot run."""
import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from conftest import MEDIA, need, pypi_upstream
from tidyface.cache import ModelCache
from tidyface.ops import graphs
from tidyface.registry import get

RAW_TOL = 1e-4  # as the ONNX parity tests: max abs difference of raw outputs


@pytest.fixture(autouse=True)
def _graphs_on(monkeypatch):
    monkeypatch.delenv("TIDYFACE_CPU_GRAPHS", raising=False)  # on unless turned off


class Toy(nn.Module):
    traceable_forward = True

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv2(torch.relu(self.conv1(x)))
        return y.flatten(1), y.sigmoid()


class ValueBranch(Toy):
    def forward(self, x):  # control flow on a value: a trace would fit only its own input
        y = self.conv1(x)
        return y if y.mean() > 0 else -y


def toy(cls=Toy):
    return graphs.run_as_graphs(cls().eval(), cls.__name__)


def assert_same(a, b, tol=RAW_TOL):
    for u, v in zip(graphs._flat(a), graphs._flat(b)):
        torch.testing.assert_close(u, v, atol=tol, rtol=0)


def fused() -> bool:
    """Whether the last graph run was partitioned into oneDNN fusion groups."""
    return "prim::oneDNNFusionGuard" in str(torch.jit.last_executed_optimized_graph())


def test_outside_a_stream_every_call_runs_eager():
    m = toy()
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        for _ in range(4):
            assert_same(m(x), m.forward.forward(x), tol=0)
    assert not m.forward.graphs


def test_in_a_stream_a_shape_runs_its_graph_from_the_first_call():
    m = toy()
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        want = m.forward.forward(x)
        with graphs.stream(m):
            first = m(x)
            assert len(m.forward.graphs) == 1
            second = m(x)
            assert fused()
        after = m(x)
    assert_same(first, want)
    for a, b in zip(first, second):
        assert torch.equal(a, b)  # the first call already gave the graph's result
    assert_same(after, want, tol=0)  # the stream closed: eager again
    assert m.forward.streams == 0
    assert not torch._C._jit_llga_enabled()  # the process-wide switch is put back


def test_a_result_does_not_depend_on_what_ran_before(monkeypatch):
    monkeypatch.setattr(graphs, "MAX_GRAPHS", 2)
    x = torch.randn(1, 3, 16, 16)
    others = [torch.randn(3, 3, 8, 24), torch.randn(1, 3, 16, 16).contiguous(memory_format=torch.channels_last),
              torch.randn(2, 3, 12, 12)]
    with torch.no_grad():
        fresh = toy()
        with graphs.stream(fresh):
            want = fresh(x)
        used = toy()
        with graphs.stream(used):
            used(x)
            for y in others:  # x's graph is dropped (least recently used), then rebuilt
                used(y)
            assert len(used.forward.graphs) == 2
            got = used(x)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_calls_a_graph_cannot_serve_run_eager_and_build_nothing():
    m = toy()
    x = torch.randn(1, 3, 16, 16)
    with graphs.stream(m):
        m(x)  # gradients on
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            m(x)
        assert not m.forward.graphs
        with torch.no_grad():
            m(x)  # the one eligible call
    assert len(m.forward.graphs) == 1
    assert not any(p.requires_grad for p in m.parameters())  # a graph holds them as constants


def test_a_forward_that_reads_values_stays_eager_with_one_warning():
    m = toy(ValueBranch)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad(), graphs.stream(m):
        with pytest.warns(RuntimeWarning, match="ValueBranch runs op by op on the CPU: it could not be traced"):
            got = m(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert_same(m(-x), m.forward.forward(-x), tol=0)
    assert m.forward.disabled and not m.forward.graphs
    assert_same(got, m.forward.forward(x), tol=0)


def test_a_graph_that_disagrees_with_eager_is_dropped(monkeypatch):
    def wrong(forward, x):
        return (lambda t: tuple(o + 1 for o in forward(t))), tuple(o + 1 for o in forward(x))

    monkeypatch.setattr(graphs, "_traced", wrong)
    m = toy()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad(), graphs.stream(m):
        with pytest.warns(RuntimeWarning, match="its graph differed from eager by 1"):
            got = m(x)
        assert_same(got, m.forward.forward(x), tol=0)
        assert_same(m(x), m.forward.forward(x), tol=0)
    assert m.forward.disabled


def test_streams_nest_close_on_errors_and_can_be_disabled():
    m = toy()
    inner = nn.Sequential(m)  # found inside a container too
    with graphs.stream(inner):
        with graphs.stream(m):
            assert m.forward.streams == 2
        assert m.forward.streams == 1
    with pytest.raises(KeyError):
        with graphs.stream(m):
            raise KeyError("x")
    assert m.forward.streams == 0
    with graphs.stream(m, enabled=False), torch.no_grad():
        m(torch.randn(1, 3, 8, 8))
    assert not m.forward.graphs
    with graphs.stream(nn.Conv2d(3, 3, 1), object()):  # nothing to stream: a no-op
        pass


def test_on_unless_the_environment_turns_them_off(monkeypatch):
    assert isinstance(toy().forward, graphs.GraphForward)
    monkeypatch.setenv("TIDYFACE_CPU_GRAPHS", "0")
    assert not isinstance(toy().forward, graphs.GraphForward)
    monkeypatch.setenv("TIDYFACE_CPU_GRAPHS", "1")
    assert isinstance(toy().forward, graphs.GraphForward)
    plain = nn.Conv2d(3, 3, 1)  # no traceable_forward: untouched
    assert graphs.run_as_graphs(plain, "plain") is plain and "forward" not in vars(plain)


def test_threads_share_one_model():
    m = toy()
    xs = [torch.randn(2, 3, 16, 16), torch.randn(1, 3, 16, 16)]
    want = [m.forward.forward(x) for x in xs]
    errors = []

    def work():
        try:
            with torch.inference_mode():
                for _ in range(5):
                    for x, w in zip(xs, want):
                        assert_same(m(x), w)
        except Exception as e:  # reported below: an assert in a thread would be lost
            errors.append(e)

    with graphs.stream(m):
        threads = [threading.Thread(target=work) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert len(m.forward.graphs) == 2


@pytest.fixture(scope="module")
def frame():
    import cv2

    cap = cv2.VideoCapture(str(need(MEDIA / "simplefr_video_with_identity_db/Video_2.mp4")))
    cap.set(cv2.CAP_PROP_POS_FRAMES, 100)
    ok, bgr = cap.read()
    cap.release()
    assert ok
    return torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1])).permute(2, 0, 1)[None]


@pytest.mark.parametrize("name", ["scrfd_500m", "yunet", "centerface", "retinaface_mnet025"])
def test_real_detectors_as_graphs_find_what_eager_finds(name, frame):
    if name == "centerface":
        pypi_upstream(get(name).spec)
    model = ModelCache().get(name, "cpu")
    assert isinstance(model.forward, graphs.GraphForward)
    inputs = []
    model.register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
    eager = model.detect(frame)
    with graphs.stream(model):
        as_graph = model.detect(frame)
    assert len(model.forward.graphs) == 1 and not model.forward.disabled
    graph, x = next(iter(model.forward.graphs.values())), inputs[-1]
    with torch.inference_mode():
        assert_same(graph(x), model.forward.forward(x))
    assert len(eager.boxes) == len(as_graph.boxes) >= 1
    torch.testing.assert_close(as_graph.boxes, eager.boxes, atol=0.01, rtol=0)
    torch.testing.assert_close(as_graph.landmarks, eager.landmarks, atol=0.01, rtol=0)
    torch.testing.assert_close(as_graph.scores, eager.scores, atol=RAW_TOL, rtol=0)


def test_mobilefacenet_as_a_graph_embeds_as_eager():
    model = ModelCache().get("mobilefacenet", "cpu")
    crops = torch.rand(4, 3, 112, 112) * 2 - 1
    with torch.inference_mode():
        want = model.forward.forward(crops)
        with graphs.stream(model):
            got = model(crops)
    assert len(model.forward.graphs) == 1
    assert_same(got, want)
