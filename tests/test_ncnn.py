"""The ncnn reader (tidyface/convert/ncnn.py): every storage kind of a weight blob, params, byte
accounting and its errors on hand-written files; every real Real-ESRGAN ncnn file read to its
last byte and mapped blob for blob; a graph that is not the model's architecture refused."""
import struct

import numpy as np
import pytest

from tidyface.convert.ncnn import (FLAG_FP16, FLAG_FP32_SCALED, FLAG_INT8, NcnnError, NcnnNet,
                                   read_bin, read_param)
from tidyface.registry import list_models

from conftest import WEIGHTS, need

NCNN_DIR = WEIGHTS / "realesrgan_ncnn"

PARAM = """7767517
6 7
Input            data     0 1 data
Convolution      conv_a   1 1 data a 0=2 1=1 5=1 6=3 9=2 -23310=1,2.000000e-01
Split            split    1 2 a a0 a1
PReLU            prelu    1 1 a0 p 0=2
InnerProduct     fc       1 1 p f 0=2 1=0 2=5 8=1
Eltwise          sum      2 1 a1 f out 0=1 1=0.5,1.0 3=hello
"""


def _bin(fc_flag=FLAG_INT8) -> bytes:
    """conv_a: 3 float16 weights (6 bytes, 2 of padding) + 2 raw biases; prelu: 2 raw slopes;
    fc: 5 int8 weights (3 of padding) + 2 raw weight scales + 1 raw input scale."""
    conv = struct.pack("<I", FLAG_FP16) + np.array([0.5, -1.25, 2.0], "<f2").tobytes() + b"\0\0"
    conv += np.array([0.1, 0.2], "<f4").tobytes()
    prelu = np.array([0.25, 0.75], "<f4").tobytes()
    fc = struct.pack("<I", fc_flag) + np.array([1, -2, 3, -4, 5], np.int8).tobytes() + b"\0\0\0"
    fc += np.array([10.0, 20.0, 0.5], "<f4").tobytes()
    return conv + prelu + fc


def _write(tmp_path, param=PARAM, data=None):
    p, b = tmp_path / "m.param", tmp_path / "m.bin"
    p.write_text(param)
    b.write_bytes(_bin() if data is None else data)
    return p, b


def test_params_blobs_and_storage_kinds(tmp_path):
    net = NcnnNet(*_write(tmp_path))
    conv, prelu, fc, eltwise = (net.layers[i] for i in (1, 3, 4, 5))
    assert conv.params == {0: 2, 1: 1, 5: 1, 6: 3, 9: 2, 10: [0.2]}  # old-style array -23310
    assert eltwise.params == {0: 1, 1: [0.5, 1.0], 3: "hello"}  # new-style array, a string
    np.testing.assert_array_equal(conv.weights["weight"], [0.5, -1.25, 2.0])
    assert conv.weights["weight"].dtype == np.float32
    np.testing.assert_allclose(conv.weights["bias"], [0.1, 0.2])
    np.testing.assert_array_equal(prelu.weights["slope"], [0.25, 0.75])
    assert fc.weights["weight"].dtype == np.int8 and fc.weights["weight"].tolist() == [1, -2, 3, -4, 5]
    np.testing.assert_array_equal(fc.weights["weight_int8_scales"], [10.0, 20.0])
    np.testing.assert_array_equal(fc.weights["input_int8_scale"], [0.5])
    assert net.source("a1") is conv and net.sources(eltwise) == [conv, fc]  # through the Split


def test_float32_flags_and_table_quantized_weights(tmp_path):
    param = "7767517\n2 2\nInput data 0 1 data\nConvolution c 1 1 data out 0=1 1=1 6=3\n"
    for flag in (0, FLAG_FP32_SCALED):
        data = struct.pack("<I", flag) + np.array([1.5, -2.5, 3.0], "<f4").tobytes()
        layers = read_param(_write(tmp_path, param, data)[0])
        read_bin(layers, tmp_path / "m.bin")
        np.testing.assert_array_equal(layers[1].weights["weight"], [1.5, -2.5, 3.0])
    table = np.arange(256, dtype="<f4") / 8  # any other non-zero flag: a 256-value codebook
    data = struct.pack("<I", 0x01010101) + table.tobytes() + bytes([7, 0, 255]) + b"\0"
    layers = read_param(_write(tmp_path, param, data)[0])
    read_bin(layers, tmp_path / "m.bin")
    np.testing.assert_array_equal(layers[1].weights["weight"], [7 / 8, 0, 255 / 8])


def test_leftover_truncated_and_unknown_bytes_are_errors_naming_the_file(tmp_path):
    with pytest.raises(NcnnError, match=r"m\.bin: 4 bytes left over"):
        NcnnNet(*_write(tmp_path, data=_bin() + b"\0" * 4))
    with pytest.raises(NcnnError, match=r"m\.bin: blob fc\.input_int8_scale"):
        NcnnNet(*_write(tmp_path, data=_bin()[:-2]))
    with pytest.raises(NcnnError, match=r"m\.bin: blob conv_a\.weight .*needs 8 bytes"):
        NcnnNet(*_write(tmp_path, data=_bin()[:9]))  # the float16 padding must be there too
    unknown = PARAM.replace("PReLU            prelu", "Embed            prelu")
    with pytest.raises(NcnnError, match=r"m\.bin: layer prelu has type Embed"):
        NcnnNet(*_write(tmp_path, param=unknown))


@pytest.mark.parametrize("bad, message", [
    (PARAM.replace("7767517", "7767518"), "magic 7767518"),
    (PARAM.replace("6 7", "6 8"), "header says 6 layers and 8 blobs"),
    (PARAM.replace("1 1 p f", "1 1 q f"), r"layer fc reads blobs \['q'\]"),
    (PARAM.replace("-23310=1,", "-23310=2,"), "says 2 values, has 1"),
    (PARAM.replace("8=1", "40=1"), "param id 40"),
])
def test_malformed_params_are_refused(tmp_path, bad, message):
    with pytest.raises(NcnnError, match=message):
        read_param(_write(tmp_path, param=bad)[0])


NCNN_SPECS = [e.spec for e in list_models("enhance") if e.spec.name.endswith("_ncnn")]


@pytest.mark.parametrize("spec", NCNN_SPECS, ids=lambda s: s.name)
def test_every_real_file_is_read_and_mapped_to_its_last_blob(spec):
    from tidyface.registry import get

    paths = {f.filename: need(NCNN_DIR / f.filename) for f in spec.files}
    param, weights = (p for n, p in sorted(paths.items(), key=lambda kv: not kv[0].endswith(".param")))
    net = NcnnNet(param, weights)  # a byte left over would raise here
    values = sum(w.size for layer in net.layers for w in layer.weights.values())
    assert values == spec.meta.num_params  # every weight value is a model parameter ...
    state = spec.converter(paths)  # ... and the converter maps every blob (else NcnnError)
    assert sum(v.numel() for v in state.values()) == spec.meta.num_params
    get(spec.name).builder().load_state_dict(state, strict=True)


def test_a_graph_that_is_not_the_architecture_is_refused():
    from tidyface.models import esrgan

    def pair(stem):
        return {f"{stem}{ext}": need(NCNN_DIR / f"{stem}{ext}") for ext in (".param", ".bin")}

    x2 = esrgan._ncnn_converter(esrgan.animevideov3_x2, esrgan._match_animevideo(2))
    with pytest.raises(NcnnError, match="expected the bicubic resize by 2/4"):
        x2(pair("realesr-animevideov3-x4"))  # the x4 graph has no resize
    x4plus = esrgan._ncnn_converter(esrgan.realesrgan_x4plus, lambda net: esrgan._match_rrdbnet(net, 23))
    with pytest.raises(NcnnError, match="the graph has 6 RRDBs, the model 23"):
        x4plus(pair("realesrgan-x4plus-anime"))  # 6 blocks, not 23
