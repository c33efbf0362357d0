"""A plugin model for tidyface's tests: RetinaFace's boxes without its landmarks, the way
YOLOv3 or Faster R-CNN face detectors answer. It registers through the `tidyface.models`
entry point and reuses RetinaFace's upstream weights, so its boxes are real."""
from tidyface.convert import load_torch_file
from tidyface.models.retinaface import RetinaFace, convert_state_dict
from tidyface.registry import ModelMeta, TaskDefaults, UpstreamFile, WeightSpec, get, register


class BoxOnlyDetector(RetinaFace):
    def __init__(self):
        super().__init__("mobilenet0.25")

    def detect(self, images, *, min_score=None, max_size=None):
        dets = super().detect(images, min_score=min_score, max_size=max_size)
        dets.landmarks = None
        return dets


def _convert(paths):
    return convert_state_dict(load_torch_file(paths["mobilenet0.25_Final.pth"]))


def register_models():
    upstream = get("retinaface_mnet025").spec
    file = upstream.files[0]
    register(WeightSpec(
        name="boxonly_detector", task="detect",
        files=(UpstreamFile(file.filename, file.sha256, file.size, file.urls, file.pypi),),
        license=upstream.license, origin="tidyface tests (RetinaFace weights, landmarks dropped)",
        converter=_convert, meta=ModelMeta(colour="BGR", mean=upstream.meta.mean, num_params=upstream.meta.num_params),
        defaults=TaskDefaults(min_score=0.5, max_size=1280),
        description="test plugin: boxes only"), BoxOnlyDetector, source="tidyface-boxonly")
