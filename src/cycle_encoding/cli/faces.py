"""Commands about face photos: ``align`` (FFHQ-style alignment with dlib's 68 landmarks)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..checkpoints.generator import load_generator
from ..data.align import LandmarkDetector, align_files
from ..data.images import list_images
from ..errors import CycleEncodingError
from ..progress import Progress
from .common import EXIT_SOME_FAILED, add_command, add_progress_arg, check_output_folder


def _upsample(value: str) -> str | int:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("use auto or a number of times (0, 1, 2)") from None
    if n < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return n


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = add_command(
        sub, common, "align", cmd_align,
        help="FFHQ-align the faces of photos (dlib 68 landmarks), one PNG per face",
        description="Align faces as the FFHQ dataset was made (dlib's 68 landmarks; docs/FACES.md). Writes "
        "OUT/<name>.png (the largest face) or OUT/<name>_00.png, _01.png, ... (--all-faces, largest first). Images "
        "without a face are reported by name and skipped; existing outputs are kept (a re-run resumes) unless "
        "--overwrite. Exit status: 0 every image aligned, 3 some had no face or could not be read (listed; the others "
        "are written, as invert and edit do), 2 bad input (nothing written).",
    )  # fmt: skip
    p.add_argument("input", type=Path, nargs="?", metavar="INPUT", help="an image file or a folder of images")
    p.add_argument("out", type=Path, nargs="?", metavar="OUT", help="output folder")
    p.add_argument("--size", type=int, default=None,
                   help="output size in pixels (default: the --generator's resolution, else 256)")  # fmt: skip
    p.add_argument("--generator", default=None,
                   help="align at the size this generator makes (printed); alone, without INPUT and OUT, only print "
                        "that size")  # fmt: skip
    p.add_argument("--all-faces", action="store_true", help="align every face found, not only the largest")
    p.add_argument("--overwrite", action="store_true", help="redo images whose output already exists")
    p.add_argument("--predictor", type=Path, default=None,
                   help="dlib 68-point predictor file (default: /usr/share/dlib/shape_predictor_68_face_landmarks.dat "
                        "from Debian libdlib-data, or $CYCLE_ENCODING_DLIB_PREDICTOR)")  # fmt: skip
    p.add_argument("--upsample", type=_upsample, default="auto",
                   help="times the face detector doubles the image first to find small faces: auto (1 for images up "
                        "to 1200 px, else 0), 0, 1, 2 (default auto)")  # fmt: skip
    p.add_argument("--supersample", type=int, default=4, help="render the quad at this many times --size (FFHQ: 4)")
    add_progress_arg(p)


def cmd_align(args: argparse.Namespace) -> int:
    if args.generator is not None:
        res = load_generator(args.generator, "cpu").resolution
        print(f"{args.generator} makes {res}x{res} images: align its targets with --size {res}")
        if args.size is not None and args.size != res:
            print(f"warning: --size {args.size} is not the generator's {res}: the aligned faces will be resized "
                  f"({'upsampled: blurry targets' if args.size < res else 'downsampled'}) when inverted",
                  file=sys.stderr)  # fmt: skip
        args.size = args.size or res
        if args.input is None and args.out is None:
            return 0
    if args.input is None or args.out is None:
        raise CycleEncodingError("give INPUT and OUT (or only --generator, to print the size it wants)")
    args.size = args.size or 256
    if args.size < 8:
        raise CycleEncodingError(f"--size {args.size} is too small (use 8 or more, e.g. 256)")
    if args.supersample < 1:
        raise CycleEncodingError("--supersample must be 1 or more")
    check_output_folder(args.out, "OUT")
    files = [Path(args.input)] if Path(args.input).is_file() else list_images(args.input)
    if not files:
        raise CycleEncodingError(f"{args.input}: no image files (.jpg, .png, ...) in this folder")
    detector = LandmarkDetector(args.predictor, upsample=args.upsample)

    bar = Progress(len(files), "align", "img", args.progress if len(files) > 1 else "none", heartbeat=30)

    def event(kind: str, path: Path, detail: object) -> None:
        if kind == "no_face":
            bar.say(f"no face found: {path}")
        elif kind == "failed":
            bar.say(f"skipped: {detail}")
        bar.update(1)

    rep = align_files(
        files,
        args.out,
        detector,
        size=args.size,
        all_faces=args.all_faces,
        overwrite=args.overwrite,
        supersample=args.supersample,
        on_event=event,
    )
    bar.close()
    done = len(files) - len(rep.no_face) - len(rep.failed) - len(rep.skipped)
    parts = [f"aligned {len(rep.written)} face(s) from {done} image(s) into {args.out}"]
    counts = ((rep.skipped, "already done"), (rep.no_face, "without a face"), (rep.failed, "unreadable"))
    parts += [f"{len(some)} {what}" for some, what in counts if some]
    print("; ".join(parts))
    return EXIT_SOME_FAILED if (rep.no_face or rep.failed) else 0
