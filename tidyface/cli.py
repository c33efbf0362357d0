"""The `tidyface` command (python-fire): thin wrappers that map flags to task functions.

Imports are inside the commands so that `tidyface --help` stays fast.
"""
from __future__ import annotations

import sys


def _fail(msg: str) -> None:
    print(f"tidyface: error: {msg}", file=sys.stderr)
    sys.exit(2)


class Commands:
    """tidyface: faces in photos and videos (run `tidyface COMMAND --help`)."""

    def detect(self, *paths: str, model: str = "retinaface_mnet025", min_score: float | None = None,
               device: str | None = None, batch_size: int = 8, out: str | None = None,
               max_size: int | None = None, weights_dir: str | None = None):
        """Detect faces; prints one JSON object per image on stdout.

        Args:
            paths: images, folders of images (searched recursively) or .txt lists of paths.
            model: detector name (`tidyface models` lists them): retinaface_mnet025 or mtcnn.
            min_score: drop faces scoring below this (default: the model's own threshold).
            device: cpu, cuda, cuda:1 ... (default: cuda when present).
            batch_size: images per forward pass (same-size images are batched together).
            out: also write each image with boxes, scores and landmarks drawn into this folder.
            max_size: the longer side the detector sees (default: the model's policy, RetinaFace
                640; 0: full resolution); boxes are always in the input image's pixels.
            weights_dir: a folder holding upstream weight files (like TIDYFACE_MIRROR).
        """
        from .tasks.detect import run_detect

        if not paths:
            _fail("give at least one image, folder or .txt list")
        sys.exit(run_detect(paths, model=model, min_score=min_score, device=device,
                            batch_size=batch_size, out=out, weights_dir=weights_dir, max_size=max_size))

    def crop(self, *paths: str, out: str | None = None, landmarks: str | None = None,
             output_size=256, face_factor: float | None = None, template: str = "arcface",
             allow_skew: bool = False, padding: str = "constant", crop_mode: str = "align",
             bbox_scale: float = 1.25, strategy: str = "all", det_model: str = "retinaface_mnet025",
             det_threshold: float | None = None, device: str | None = None, batch_size: int = 8,
             ext: str = "jpg", overwrite: bool = False, weights_dir: str | None = None):
        """Align and crop faces; writes the crops (mirroring the input tree) and OUT/crops.json.

        Args:
            paths: images, folders of images (searched recursively) or .txt lists of paths.
            out: output folder.
            landmarks: a .json/.csv/.txt file of landmarks (5, 68, 98 or 106 points) instead of detection.
            output_size: N or W,H in pixels.
            face_factor: share of the output's shorter side taken by the face, in (0, 1)
                (default: the template's own framing; see docs/face_factor.md).
            template: arcface, ffhq, or a file with 5 points and their frame size.
            allow_skew: fit an affine transform instead of a similarity.
            padding: constant, replicate, reflect or wrap: what fills the crop beyond the image.
            crop_mode: align (5-point template) or bbox (DECA-style square box).
            bbox_scale: bbox mode: enlargement of the landmark or detector box.
            strategy: all, largest or best (highest score) face per image.
            det_model: detector (`tidyface models --task detect`).
            det_threshold: drop faces scoring below this.
            device: cpu, cuda, ... (default: cuda when present).
            batch_size: images per detector pass.
            ext: jpg or png.
            overwrite: replace an earlier crop result in OUT (deletes exactly its files).
            weights_dir: a folder holding upstream weight files (like TIDYFACE_MIRROR).
        """
        from .tasks.crop import run_crop

        if not paths:
            _fail("give at least one image, folder or .txt list")
        if not out:
            _fail("give --out DIR")
        sys.exit(run_crop(paths, out, landmarks=landmarks, output_size=output_size,
                          face_factor=face_factor, template=template, allow_skew=allow_skew,
                          padding=padding, crop_mode=crop_mode, bbox_scale=bbox_scale,
                          strategy=strategy, det_model=det_model, det_threshold=det_threshold,
                          device=device, batch_size=batch_size, ext=ext, overwrite=overwrite,
                          weights_dir=weights_dir))

    def embed(self, *paths: str, out: str = "", model: str = "facenet_casia_tf",
              det_model: str = "retinaface_mnet025", min_score: float | None = None,
              enc_area: str | None = None, device: str | None = None, batch_size: int = 32,
              weights_dir: str | None = None):
        """Detect, align and embed every face; writes one row per face into an .npz.

        Args:
            paths: images, folders of images (searched recursively) or .txt lists of paths.
            out: the .npz to write: embeddings (N,D) float32 L2-normalised, source, face_index,
                boxes, scores, landmarks.
            model: encoder: facenet_casia_tf, mobilefacenet, facenet_vggface2, facenet_casia.
            det_model: detector (`tidyface models --task detect`).
            min_score: detector score threshold (default: the detector's own).
            enc_area: "x1 y1 x2 y2" fractions of the face box to embed, unaligned, instead of
                aligning the 5 landmarks onto the encoder's template.
            device: cpu, cuda, ... (default: cuda when present).
            batch_size: faces per encoder forward pass.
            weights_dir: a folder holding upstream weight files (like TIDYFACE_MIRROR).
        """
        from .tasks.embed import embed

        if not paths or not out:
            _fail("usage: tidyface embed PATH... --out FILE.npz")
        table = embed(paths, model=model, det_model=det_model, min_score=min_score, device=device,
                      batch_size=batch_size, enc_area=enc_area, weights_dir=weights_dir)
        table.save(out)
        print(f"tidyface: {len(table)} faces from {len(set(table.source))} images -> {out}",
              file=sys.stderr)

    def group(self, path: str, out: str = "", mode: str = "auto", clusters: str = "2-9",
              clusters_save_all: bool = False, random_state: int = 0, ref_dir: str | None = None,
              enc_oth_thr: float = -1, auto_thr: float | None = None, cropped: bool = False,
              enc_model: str = "facenet_casia_tf", det_model: str = "retinaface_mnet025",
              det_min_score: float | None = None, hash_thr: int = -1, enc_dup_thr: float = -1,
              enc_area: str | None = None, group_log: bool = False, device: str | None = None,
              batch_size: int = 32, overwrite: bool = False, weights_dir: str | None = None):
        """Sort the faces in a folder of photos (or of face crops) into one folder per person.

        Writes OUT/<group>/<face>.jpg and OUT/groups.csv (file,source,face_index,group,distance).

        Args:
            path: a folder (searched recursively) of photos, or of face crops with --cropped.
            out: the output folder; must be empty (or a previous result, with --overwrite).
            mode: auto (threshold clustering, no k; faces matching nobody go to unassigned/),
                cluster (KMeans, k chosen by silhouette) or classify (against --ref-dir).
            clusters: k for cluster mode: a range 2-9, a list 2,4,6 or one number.
            clusters_save_all: cluster mode: also write the grouping for every k under G<k>/.
            random_state: seed of KMeans.
            ref_dir: classify mode: one subfolder per person with one or more reference images.
            enc_oth_thr: classify mode: faces at cosine distance >= this from every person go to
                other/ (-1: every face gets its nearest person).
            auto_thr: auto mode: average-linkage cosine distance threshold (default: the
                encoder's, chosen on labelled data; see README).
            cropped: the images are face crops (one face each): no detection.
            enc_model: encoder (`tidyface models --task embed`).
            det_model: detector (`tidyface models --task detect`).
            det_min_score: detector score threshold (default: the detector's own).
            hash_thr: dedup pass 1: faces whose 64-bit average hashes differ in <= this many bits
                are duplicates (0: identical only; -1: off).
            enc_dup_thr: dedup pass 2: faces at cosine distance <= this are duplicates (0: identical
                only; -1: off). Each duplicate set keeps its largest, sharpest face.
            enc_area: "x1 y1 x2 y2" fractions of the face (box, or crop with --cropped) to embed
                unaligned, instead of aligning landmarks to the encoder's template.
            group_log: also write group_log.csv with the distances behind each decision.
            device: cpu, cuda, ... (default: cuda when present).
            batch_size: faces per encoder forward pass.
            overwrite: replace an earlier tidyface group result in OUT.
            weights_dir: a folder holding upstream weight files (like TIDYFACE_MIRROR).
        """
        from .tasks.group import OutputExistsError, run_group

        if not out:
            _fail("usage: tidyface group PATH --out DIR")
        try:
            run_group(path, out, mode=mode, clusters=clusters, clusters_save_all=clusters_save_all,
                      random_state=random_state, ref_dir=ref_dir, enc_oth_thr=enc_oth_thr,
                      auto_thr=auto_thr, cropped=cropped, model=enc_model, det_model=det_model,
                      min_score=det_min_score, hash_thr=hash_thr, enc_dup_thr=enc_dup_thr,
                      enc_area=enc_area, group_log=group_log, device=device, batch_size=batch_size,
                      overwrite=overwrite, weights_dir=weights_dir)
        except (OutputExistsError, ValueError, FileNotFoundError) as e:
            _fail(str(e))

    def video2faces(self, input: str | None = None, i: str | None = None, out_dir: str | None = None,
                    out_prefix: str = "", input_ext: str = "mkv;mp4", mode: str = "full", style: str = "live",
                    device: str | None = None, video_step: float = 1.0, video_fragment=None, video_area=None,
                    video_reader: str = "opencv", det_model: str | None = None, det_batch_size: int = 4,
                    det_min_score: float = 0.4, det_min_size: int = 50, det_min_border: int = 5,
                    det_scale=(1.5, 1.5, 2.2, 1.2), det_square: bool = True, det_size: int | None = 640,
                    hash_thr: int = 8, enc_model: str | None = None, enc_batch_size: int = 16, enc_area=None,
                    enc_dup_thr: float = 0.25, group_mode: str = "auto", clusters: str = "2-9",
                    clusters_save_all: bool = False, random_state: int = 0, ref_dir: str | None = None,
                    enc_oth_thr: float = -1, auto_thr: float | None = None, group_log: bool = False,
                    save_frames: bool = False, save_rejects: bool = False, save_dupes: bool = False,
                    overwrite: bool = False, weights_dir: str | None = None):
        """Turn videos into face images grouped per person (see README for every flag).

        Args:
            input: a video, a folder of videos (see --input-ext) or a .txt list of paths (also -i).
            i: same as input.
            out_dir: output folder (default: beside the input).
            out_prefix: prefix of face file names [prefix][k_]FFFFFF_I.jpg.
            input_ext: extensions of the videos to take from a folder, ';'-separated.
            mode: full, detection (faces + manifest only) or grouping (re-group earlier detections).
            style: live or anime.
            device: cpu, cuda, ... (default: cuda when present).
            video_step: seconds between sampled frames.
            video_fragment: START_MIN,END_MIN: only this part of each video, in minutes.
            video_area: X1,Y1,X2,Y2: only this rectangle of the frame, in pixels.
            video_reader: opencv or pyav.
            det_model: detector (default for live: retinaface_mnet025).
            det_batch_size: frames per detector pass.
            det_min_score: reject faces scoring below this.
            det_min_size: reject faces whose box is narrower or shorter than this (pixels).
            det_min_border: reject faces closer than this to a frame border (pixels).
            det_scale: SL,SR,SU,SD: how far each border of the saved crop moves from the box centre.
            det_square: make saved crops square (shifted, not shrunk, at frame borders).
            det_size: the detector sees frames shrunk to this longer side (speed; 0 or None: full).
            hash_thr: dedup pass 1: average-hash difference in bits (0: identical only; -1: off).
            enc_model: encoder (default for live: mobilefacenet).
            enc_batch_size: faces per encoder pass.
            enc_area: X1,Y1,X2,Y2 fractions of the face box to embed unaligned (default: align).
            enc_dup_thr: dedup pass 2: cosine distance between embeddings (0: identical; -1: off).
            group_mode: auto, cluster or classify.
            clusters: cluster mode: k range 2-9, list 2,4,6 or one number.
            clusters_save_all: cluster mode: also write every k under groups/G<k>/.
            random_state: seed of KMeans.
            ref_dir: classify mode: one subfolder of reference images per person.
            enc_oth_thr: classify mode: faces this far (cosine) from every person go to other/ (-1: off).
            auto_thr: auto mode: average-linkage cosine distance threshold (default: the encoder's).
            group_log: write log_grouping.csv with the distances behind each decision.
            save_frames: write sampled frames with boxes (green kept, red rejected) to intermediate/frames.
            save_rejects: write rejected faces to intermediate/rejects and log_rejects.csv.
            save_dupes: write duplicates to intermediate/dupes1|2 with log_dupes1|2.csv.
            overwrite: replace the results of an earlier run in the output folder.
            weights_dir: a folder holding upstream weight files (like TIDYFACE_MIRROR).
        """
        from .tasks.video2faces import Video2FacesError, video_to_faces

        src = input or i
        if not src:
            _fail("usage: tidyface video2faces VIDEO|FOLDER|LIST.txt [flags]")
        try:
            summary = video_to_faces(
                src, out_dir=out_dir, out_prefix=out_prefix, input_ext=input_ext, mode=mode, style=style,
                device=device, video_step=video_step, video_fragment=video_fragment, video_area=video_area,
                video_reader=video_reader, det_model=det_model, det_batch_size=det_batch_size,
                det_min_score=det_min_score, det_min_size=det_min_size, det_min_border=det_min_border,
                det_scale=det_scale, det_square=det_square, det_size=det_size or None, hash_thr=hash_thr,
                enc_model=enc_model, enc_batch_size=enc_batch_size, enc_area=enc_area, enc_dup_thr=enc_dup_thr,
                group_mode=group_mode, clusters=clusters, clusters_save_all=clusters_save_all,
                random_state=random_state, ref_dir=ref_dir, enc_oth_thr=enc_oth_thr, auto_thr=auto_thr,
                group_log=group_log, save_frames=save_frames, save_rejects=save_rejects, save_dupes=save_dupes,
                overwrite=overwrite, weights_dir=weights_dir)
        except (Video2FacesError, ValueError, FileNotFoundError) as e:
            _fail(str(e))
        except KeyboardInterrupt:
            print("tidyface: interrupted; run the same command again to resume", file=sys.stderr)
            sys.exit(130)
        if summary["failed"]:
            sys.exit(1)

    def models(self, task: str | None = None, weights_dir: str | None = None):
        """Print the weights catalogue: name, task, licence, upstream files, sha256, size, local?

        Args:
            task: only models of this task (detect, embed, ...).
            weights_dir: also look for upstream files in this folder (like TIDYFACE_MIRROR).
        """
        from .registry import list_models
        from .weights import is_available

        rows = [("name", "task", "licence", "upstream file", "sha256", "size", "local", "from")]
        for e in list_models(task):
            s = e.spec
            local = "yes" if is_available(s, weights_dir) else "no"
            for i, f in enumerate(s.files):
                first = i == 0
                rows.append((s.name if first else "", s.task if first else "", s.license if first else "",
                             f.filename, (f.sha256[:16] + "...") if f.sha256 else "unknown",
                             f"{f.size:,}" if f.size else "unknown", local if first else "",
                             e.source if first else ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def main() -> None:
    import fire

    from .ops.memory import keep_freed_memory
    from .weights import WeightsError

    keep_freed_memory()
    try:
        fire.Fire(Commands(), name="tidyface")
    except WeightsError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        print("tidyface: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
