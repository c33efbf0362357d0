"""Nothing a user types loses data, crashes, or is silently ignored: each fault found by trying
tidyface as a demanding new user would, one test (or one parametrised class) each."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MEDIA, need
from tidyface import cli
from tidyface.ops.image import read_image, write_image

ASTRONAUT = MEDIA / "skimage/astronaut.png"
T1 = MEDIA / "insightface_wheel/t1.jpg"
CLIP = MEDIA / "videos/face_recognition_short_hamilton_clip.mp4"


def run(capsys, *args) -> tuple[int, str, str]:
    """The command in this process (no interpreter start per call): exit code, stdout, stderr."""
    try:
        cli.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def refused(capsys, *args, match: str) -> str:
    code, _, err = run(capsys, *args)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("tidyface: error:") and match in err, err
    return err


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    shutil.copy(need(ASTRONAUT), d / "a.png")
    shutil.copy(need(T1), d / "b.jpg")
    return d


# ----------------------------------------------------------------------------- data loss

@pytest.mark.parametrize("command", ["detect", "crop", "group"])
def test_an_output_that_is_or_lies_inside_an_input_is_refused(capsys, photos, command):
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    flag = "--out"
    for out in (photos, photos / "drawn"):
        refused(capsys, command, photos, flag, out, match="overlaps the input")
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before


def test_video2faces_output_inside_its_input_folder_is_refused(capsys, tmp_path):
    src = tmp_path / "videos"
    src.mkdir()
    shutil.copy(need(CLIP), src / "c.mp4")
    refused(capsys, "video2faces", src, "--out-dir", src / "out", match="overlaps the input")


def test_earlier_results_are_not_read_as_inputs(capsys, photos, tmp_path):
    code, _, err = run(capsys, "crop", photos, "--out", tmp_path / "crops")
    assert code == 0, err
    shutil.move(tmp_path / "crops", photos / "crops")  # a result that ended up inside the inputs
    code, out, _ = run(capsys, "detect", photos)
    assert code == 0 and sorted(Path(json.loads(l)["image"]).name for l in out.splitlines()) == ["a.png", "b.jpg"]


@pytest.mark.parametrize("word", ["false", "no", "0", "False"])
def test_overwrite_false_never_deletes(capsys, photos, tmp_path, word):
    out = tmp_path / "crops"
    assert run(capsys, "crop", photos, "--out", out)[0] == 0
    before = sorted(p.name for p in out.rglob("*"))
    refused(capsys, "crop", photos, "--out", out, "--overwrite", word, match="already holds")
    refused(capsys, "crop", photos, "--out", out, f"--overwrite={word}", match="already holds")
    assert sorted(p.name for p in out.rglob("*")) == before


def test_overwrite_removes_only_what_the_command_wrote(capsys, photos, tmp_path):
    out = tmp_path / "g"
    assert run(capsys, "group", photos, "--out", out)[0] == 0
    (out / "my_notes.txt").write_text("mine")
    code, _, err = run(capsys, "group", photos, "--out", out, "--overwrite")
    # a folder holding files the command did not write is not its to replace
    assert code == 2 and "no tidyface group run wrote" in err and (out / "my_notes.txt").read_text() == "mine"
    (out / "my_notes.txt").unlink()
    assert run(capsys, "group", photos, "--out", out, "--overwrite")[0] == 0


def test_overwrite_refuses_another_commands_result(capsys, photos, tmp_path):
    out = tmp_path / "res"
    assert run(capsys, "crop", photos, "--out", out)[0] == 0
    refused(capsys, "group", photos, "--out", out, "--overwrite", match="holds a tidyface crop result")
    assert (out / "crops.json").is_file()


def test_a_folder_in_use_is_refused_and_a_stale_lock_taken_over(capsys, photos, tmp_path):
    out = tmp_path / "crops"
    (out / ".tidyface").mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".tidyface/lock").write_text(str(sleeper.pid))
        refused(capsys, "crop", photos, "--out", out, match=f"in use by another tidyface run (pid {sleeper.pid})")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert run(capsys, "crop", photos, "--out", out)[0] == 0  # the dead run's lock is stale
    assert not (out / ".tidyface/lock").exists()


def test_names_stay_inside_the_output_folder(capsys, tmp_path):
    refused(capsys, "video2faces", need(CLIP), "--out-dir", tmp_path / "o", "--out-prefix", "../../x_",
            match="--out-prefix")


# ----------------------------------------------------------------------------- crashes and hangs

def test_paths_are_strings_whatever_they_look_like(capsys, tmp_path):
    d = tmp_path / "2024"
    d.mkdir()
    shutil.copy(need(ASTRONAUT), d / "7.png")
    os.chdir(tmp_path)
    code, out, err = run(capsys, "detect", "2024", "--out", "2027")
    assert code == 0, err
    assert json.loads(out)["image"] == "2024/7.png" and (tmp_path / "2027/7.png").is_file()


@pytest.mark.parametrize("spelling", [["1,1,2,1"], ["1 1 2 1"], ["[1,1,2,1]"], ["1", "1", "2", "1"]])
def test_list_flags_take_every_spelling(spelling):
    fn = cli.COMMANDS["video2faces"]
    positional, flags = cli.Argv("video2faces", fn, ["v.mp4", "--det-scale", *spelling]).parse()
    assert positional == ["v.mp4"] and flags["det_scale"] == "1,1,2,1"


BAD_VALUES = [
    (["detect", "x.jpg", "--min-score", "abc"], "--min-score needs a number"),
    (["detect", "x.jpg", "--min-score", "1.5"], "--min-score must be [0.0, 1.0]"),
    (["detect", "x.jpg", "--max-size", "-1"], "--max-size must be >= 0"),
    (["detect", "x.jpg", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["video2faces", "v.mp4", "--video-step", "abc"], "--video-step needs a number"),
    (["video2faces", "v.mp4", "--hash-thr", "abc"], "--hash-thr needs a whole number"),
    (["video2faces", "v.mp4", "--enc-dup-thr", "abc"], "--enc-dup-thr needs a number"),
    (["video2faces", "v.mp4", "--enc-area", "0.9,0.9,0.1,0.1"], "--enc-area needs 4 fractions"),
    (["video2faces", "v.mp4", "--det-scale", "0,0,0,0"], "--det-scale needs 4 numbers > 0"),
    (["video2faces", "v.mp4", "--det-min-score", "-1"], "--det-min-score must be [0.0, 1.0]"),
    (["video2faces", "v.mp4", "--det-min-score", "abc"], "--det-min-score needs a number"),
    (["video2faces", "v.mp4", "--det-size", "-1"], "--det-size must be >= 0"),
    (["video2faces", "v.mp4", "--enc-batch-size", "0"], "--enc-batch-size must be >= 1"),
    (["video2faces", "v.mp4", "--video-fragment", "5,1"], "--video-fragment needs START_MIN,END_MIN"),
    (["video2faces", "v.mp4", "--video-fragment", "0.05"], "--video-fragment needs 2 numbers"),
    (["video2faces", "v.mp4", "--det-scale", "1", "2"], "--det-scale needs 4 numbers"),
    (["group", "g", "--out", "o", "--clusters", "9-2"], "9-2"),
    (["embed", "x.jpg", "--out", "e.npz", "--model", "retinaface_mnet025"], "retinaface_mnet025 is a detect model"),
    (["detect", "x.jpg", "--model", "nosuchnet"], "unknown model nosuchnet; the detect models are"),
    (["video2faces", "v.mp4", "--enc-model", "mtcnn"], "mtcnn is a detect model; the embed models are"),
    (["detect", "x.jpg", "--device", "foo"], "--device foo: not a torch device"),
    (["crop", "x.jpg", "--out", "o", "--padding", "mirror"], "--padding must be one of"),
    (["detect", "x.jpg", "--min-scor", "0.5"], "did you mean --min-score?"),
    (["crop", "x.jpg", "--out", "o", "--ouput-size", "64"], "did you mean --output-size?"),
    (["detekt", "x.jpg"], "did you mean detect?"),
]


@pytest.mark.parametrize("argv,message", BAD_VALUES, ids=[" ".join(a[0:1] + a[2:4]) for a, _ in BAD_VALUES])
def test_bad_values_are_one_line_before_any_work(capsys, tmp_path, argv, message):
    os.chdir(tmp_path)
    refused(capsys, *argv, match=message)
    assert sorted(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line(capsys):
    refused(capsys, "detect", "x.jpg", "--device", "cuda", match="no CUDA GPU is available")


def test_output_paths_are_checked_before_any_work(capsys, photos, tmp_path):
    (tmp_path / "file").write_text("x")
    refused(capsys, "crop", photos, "--out", tmp_path / "file", match="is a file")
    refused(capsys, "group", photos, "--out", tmp_path / "file" / "sub", match="is a file")
    refused(capsys, "embed", photos, "--out", tmp_path, match="is a folder")


def test_inputs_with_the_same_stem_both_count(capsys, tmp_path):
    src = tmp_path / "p"
    src.mkdir()
    shutil.copy(need(ASTRONAUT), src / "person.png")
    write_image(src / "person.jpg", read_image(need(ASTRONAUT))[:, ::-1].copy())
    assert run(capsys, "group", src, "--out", tmp_path / "g")[0] == 0
    rows = list(csv.DictReader(open(tmp_path / "g/groups.csv")))
    assert sorted(Path(r["source"]).name for r in rows) == ["person.jpg", "person.png"]
    assert len({r["file"] for r in rows}) == 2
    assert run(capsys, "group", src, "--out", tmp_path / "g", "--overwrite")[0] == 0


def test_a_closed_pipe_is_not_an_error():
    r = subprocess.run(f"{sys.executable} -m tidyface.cli models | head -1", shell=True, capture_output=True,
                       text=True)
    assert r.stdout.startswith("name") and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr


def test_a_fifo_is_not_read(capsys, tmp_path):
    fifo = tmp_path / "p.jpg"
    os.mkfifo(fifo)
    code, _, err = run(capsys, "detect", fifo)
    assert code == 1 and "p.jpg: not a regular file" in err


# ----------------------------------------------------------------------------- silently wrong

def test_help_version_and_dashes(capsys, tmp_path):
    for argv in (["detect", "-h"], ["video2faces", "-h"], ["group", "--help"], ["-h"]):
        code, out, err = run(capsys, *argv)
        assert code == 0 and "tidyface" in out + err
    code, out, _ = run(capsys, "--version")
    assert out.startswith("tidyface 0.")
    os.chdir(tmp_path)
    shutil.copy(need(ASTRONAUT), tmp_path / "-odd.png")
    refused(capsys, "detect", "-odd.png", match="put it after --")
    code, out, _ = run(capsys, "detect", "--", "-odd.png")
    assert code == 0 and json.loads(out)["image"] == "-odd.png"


def test_help_text_is_whole(capsys):
    _, out, err = run(capsys, "detect", "--help")
    text = out + err
    assert "0 means full resolution" in text and "retinaface_r50" in text


# ----------------------------------------------------------------------------- misleading messages

def test_resume_takes_the_same_video_by_any_name(capsys, tmp_path):
    video = tmp_path / "v.mp4"
    shutil.copy(need(CLIP), video)
    out = tmp_path / "out"
    assert run(capsys, "video2faces", video, "--out-dir", out, "--mode", "detection")[0] == 0
    os.chdir(tmp_path)
    code, _, err = run(capsys, "video2faces", "v.mp4", "--out-dir", "out", "--mode", "detection")
    assert code == 0 and "done in an earlier run, skipped" in err
    code, _, err = run(capsys, "video2faces", "--out-dir", "out", "--mode", "grouping")  # no input needed
    assert code == 0, err


def test_default_output_is_beside_the_input(tmp_path):
    from tidyface.tasks.video2faces import default_out_dir

    (tmp_path / "shows").mkdir()
    (tmp_path / "ep.mp4").write_bytes(b"")
    assert default_out_dir(tmp_path / "shows") == tmp_path.resolve() / "shows_faces"
    assert default_out_dir(tmp_path / "ep.mp4") == tmp_path.resolve() / "ep_faces"


def test_an_interrupted_group_can_be_overwritten(capsys, photos, tmp_path):
    out = tmp_path / "g"
    (out / ".staging").mkdir(parents=True)
    (out / ".tidyface").mkdir()
    (out / ".tidyface/owner.json").write_text(json.dumps({"command": "group", "entries": [".staging"]}))
    refused(capsys, "group", photos, "--out", out, match="--overwrite")
    assert run(capsys, "group", photos, "--out", out, "--overwrite")[0] == 0
    assert not (out / ".staging").exists()


def test_one_exit_code_rule(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(capsys, "embed", empty, "--out", tmp_path / "e.npz")[0] == 1  # nothing found: said, and 1
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"not an image")
    shutil.copy(need(ASTRONAUT), bad / "a.png")
    for argv in (["embed", bad, "--out", tmp_path / "e.npz"], ["group", bad, "--out", tmp_path / "g"],
                 ["detect", bad], ["crop", bad, "--out", tmp_path / "c"]):
        code, _, err = run(capsys, *argv)
        assert code == 1 and "x.jpg" in err, (argv, err)


def test_fragment_past_the_end_is_named(capsys, tmp_path):
    code, _, err = run(capsys, "video2faces", need(CLIP), "--out-dir", tmp_path / "o", "--video-fragment", "5,6")
    assert "after the video's end" in err


def test_inspection_flags_added_to_a_finished_run_say_what_is_missing(capsys, tmp_path):
    out = tmp_path / "o"
    assert run(capsys, "video2faces", need(CLIP), "--out-dir", out, "--video-step", "2")[0] == 0
    code, _, err = run(capsys, "video2faces", need(CLIP), "--out-dir", out, "--video-step", "2",
                       "--save-rejects", "--save-frames")
    assert code == 0 and "without --save-rejects and --save-frames" in err
    assert not (out / "intermediate/frames").exists() and not (out / "intermediate/rejects").exists()
    rejects = list(csv.DictReader(open(out / "intermediate/log_rejects.csv")))
    assert all(r["file_name"] == "" for r in rejects)  # no row names a picture that is not there


def test_every_model_flag_default_is_a_model_of_its_task():
    """Flag checks skip a model flag left at its default, so start-up imports no model module it
    will not use; the defaults themselves are checked here."""
    import dataclasses

    from tidyface import options, registry

    classes, stack = set(), [options.Options]
    while stack:
        for sub in stack.pop().__subclasses__():
            classes.add(sub)
            stack.append(sub)
    checked = set()
    for cls in classes:
        for f in dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ():
            if "model" in f.metadata and isinstance(f.default, str):
                assert registry.get(f.default).spec.task == f.metadata["model"], (cls.__name__, f.name)
                checked.add(f.default)
    assert {"bisenet_celebamask", "realesrgan_x4plus_ncnn"} <= checked
