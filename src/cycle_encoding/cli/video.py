"""``cycle-encoding video``: edit a video frame by frame with the inversion pipeline (parsing and printing only; the
work is in ``editing/video.py``)."""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path

from ..editing.directions import parse_layers
from ..editing.video import ALIGN_MODES, edit_video
from ..errors import CycleEncodingError
from ..utils import check_finite
from .common import EXIT_SOME_FAILED, add_command, add_device_arg, add_progress_arg, check_output_folder
from .edit import add_direction_args
from .invert import add_inversion_args, options_from_args, resolve_precisions


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = add_command(
        sub, common, "video", cmd_video,
        help="edit a video: crop each frame, invert and tune it, apply one edit to every frame, paste it back",
        description="Reads IN (any video FFmpeg reads; PyAV), crops every frame (--align face: the FFHQ square of "
        "its largest face, smoothed over time; --align frame: the whole frame; --crop: a fixed rectangle), inverts "
        "the crops as `invert` does (--stages, --tune-steps, ...) into OUT/run, moves every frame's pivot along the "
        "direction, renders it with the frame's tuned generator, pastes it back with a feathered mask and writes "
        "OUT/edit_STRENGTH.mp4 (H.264, the input's frame rate) per strength, OUT/preview.mp4 (input | edits), "
        "the crops (OUT/frames), the pivots (OUT/pivots.pt/.npy/.txt) and OUT/video.json. Frames without a face "
        "pass through unedited and are listed. A re-run into the same OUT skips finished frames. Exit status: 0 "
        "done, 3 some frames failed (passed through, listed), 2 bad input (e.g. not a video).",
    )  # fmt: skip
    p.add_argument("input", type=Path, metavar="IN", help="the video file")
    p.add_argument("--out", required=True, type=Path, metavar="OUT", help="the output folder")
    add_inversion_args(p)
    add_direction_args(p)
    p.add_argument("--align", dest="video_align", choices=ALIGN_MODES, default="face",
                   help="face (default): the FFHQ square of each frame's largest face (dlib 68 landmarks); frame: "
                        "the whole frame, resized to a square")  # fmt: skip
    p.add_argument("--crop", default=None, metavar="X,Y,W,H", help="crop this rectangle of every frame instead")
    p.add_argument("--smooth-align", type=float, default=2.0, metavar="SIGMA",
                   help="Gaussian smoothing of the face squares over time, in frames (default 2; 0: none)")  # fmt: skip
    p.add_argument("--smooth-pivots", type=float, default=0.0, metavar="SIGMA",
                   help="Gaussian smoothing of the pivots over time, in frames, before the edit (default 0: none)")  # fmt: skip
    p.add_argument("--feather", type=float, default=0.1,
                   help="soft edge of the paste-back mask, a fraction of the crop's side (default 0.1; 0: hard)")  # fmt: skip
    p.add_argument("--crf", type=int, default=18, help="H.264 quality of the written videos, 0-51 (default 18)")
    p.add_argument("--max-frames", type=int, default=None, metavar="N", help="only the first N frames")
    add_device_arg(p)
    add_progress_arg(p)


def cmd_video(args: argparse.Namespace) -> int:
    for flag, v in (("--smooth-align", args.smooth_align), ("--smooth-pivots", args.smooth_pivots),
                    ("--feather", args.feather)):  # fmt: skip
        check_finite(v, flag)
        if v < 0:
            raise CycleEncodingError(f"{flag} must be 0 or more, got {v}")
    if args.max_frames is not None and args.max_frames < 1:
        raise CycleEncodingError(f"--max-frames must be 1 or more, got {args.max_frames}")
    data = options_from_args(args)
    resolve_precisions(data, args.device)
    check_output_folder(args.out, "--out")
    doc = edit_video(
        args.input, args.out, args.direction, args.generator, args.encoder,
        strengths=args.strengths, component=args.component, layers=parse_layers(args.layers), mode=args.mode,
        config=data, tune=data.get("tune_mode", "each"), align=args.video_align, crop=args.crop, smooth_align=args.smooth_align,
        smooth_pivots=args.smooth_pivots, feather=args.feather, crf=args.crf, max_frames=args.max_frames,
        device=args.device, progress=args.progress,
    )  # fmt: skip
    lines = [f"{args.out}: {doc['frames']} frames at {float(Fraction(doc['fps'])):.3f} fps, {doc['edited_frames']} "
             f"edited; {', '.join(doc['files']['edits'].values())}, {doc['files']['preview']}"]  # fmt: skip
    if doc["no_face"]:
        lines.append(f"  no face (passed through): frames {', '.join(map(str, doc['no_face']))}")
    lines += [f"  failed (passed through): frame {f['frame']}: {f['reason']}" for f in doc["failed"]]
    secs = ", ".join(f"{k} {v:.2f}" for k, v in doc["seconds_per_frame"].items())
    lines.append(f"  seconds per frame: {secs}")
    lines.append(f"details: {Path(args.out) / 'video.json'}")
    print("\n".join(lines))
    return EXIT_SOME_FAILED if doc["failed"] else 0
