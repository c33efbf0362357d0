"""Stand-ins for the Real-ESRGAN and BSRGAN .pth releases, which ../shared does not carry: random
tensors under the upstream checkpoints' own key names and shapes, written here from the upstream
module definitions (no reference package runs them: basicsr does not import on this torch):

- basicsr `archs/rrdbnet_arch.py` RRDBNet(num_in_ch=3, num_out_ch=3, scale, num_feat=64,
  num_block=23, num_grow_ch=32): conv_first (in 3, 12 for scale 2), body.N.rdbK.convJ, conv_body,
  conv_up1, conv_up2, conv_hr, conv_last; Real-ESRGAN saves it as {"params_ema": ...}.
- realesrgan `archs/srvgg_arch.py` SRVGGNetCompact(num_feat=64, num_conv=16, upscale=4, prelu):
  one ModuleList body: conv, PReLU, 16 x (conv, PReLU), conv to 48; saved as {"params": ...}.
- KAIR `models/network_rrdbnet.py` RRDBNet(nf=64, nb=23, gc=32, sf=4): conv_first,
  RRDB_trunk.N.RDBK.convJ, trunk_conv, upconv1, upconv2, HRconv, conv_last; BSRGAN.pth is the
  bare state dict.
"""
import torch


def _conv(state: dict, name: str, cin: int, cout: int) -> None:
    state[f"{name}.weight"] = torch.randn(cout, cin, 3, 3) * 0.02
    state[f"{name}.bias"] = torch.randn(cout) * 0.02


def rrdbnet_state(names: dict, in_ch: int = 3, blocks: int = 23) -> dict:
    """An RRDBNet state dict under one layout's names (`names` maps the parts to its spelling)."""
    state = {}
    _conv(state, names["first"], in_ch, 64)
    for b in range(blocks):
        for r in (1, 2, 3):
            for j, cin in enumerate((64, 96, 128, 160, 192), 1):
                _conv(state, names["dense"].format(b=b, r=r, j=j), cin, 64 if j == 5 else 32)
    for part in ("trunk", "up1", "up2", "hr"):
        _conv(state, names[part], 64, 64)
    _conv(state, names["last"], 64, 3)
    return state


BASICSR = {"first": "conv_first", "dense": "body.{b}.rdb{r}.conv{j}", "trunk": "conv_body",
           "up1": "conv_up1", "up2": "conv_up2", "hr": "conv_hr", "last": "conv_last"}
KAIR = {"first": "conv_first", "dense": "RRDB_trunk.{b}.RDB{r}.conv{j}", "trunk": "trunk_conv",
        "up1": "upconv1", "up2": "upconv2", "hr": "HRconv", "last": "conv_last"}


def srvgg_state(num_conv: int = 16, upscale: int = 4) -> dict:
    state, i = {}, 0
    for cin in [3] + [64] * num_conv:
        _conv(state, f"body.{i}", cin, 64)
        state[f"body.{i + 1}.weight"] = torch.rand(64) * 0.5  # PReLU slopes
        i += 2
    _conv(state, f"body.{i}", 64, 3 * upscale * upscale)
    return state


def x4plus(path):
    torch.save({"params_ema": rrdbnet_state(BASICSR)}, path)


def x2plus(path):
    torch.save({"params_ema": rrdbnet_state(BASICSR, in_ch=12)}, path)


def animevideov3(path):
    torch.save({"params": srvgg_state()}, path)


def bsrgan(path):
    torch.save(rrdbnet_state(KAIR), path)


STAND_INS = {"realesrgan_x4plus": x4plus, "realesrgan_x2plus": x2plus,
             "realesr_animevideov3": animevideov3, "bsrgan_x4": bsrgan}
