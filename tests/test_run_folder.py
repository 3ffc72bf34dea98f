"""The run folder's hardening (issue 29): no command writes over a file of a run or over its own input; one corrupt
file fails its image only, in ``edit`` and in ``report``; image names a file system or ``latents.txt`` cannot hold
get safe folders and are shown as given; edits of an image inverted again since are not reported beside its new
reconstruction; what a killed ``edit`` left is removed by the next one, and ``edit`` never writes through a link
out of the run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import cycle_encoding as ce
from cycle_encoding.checkpoints.run_folder import NAME_BYTES, InversionRun, folder_name, lock
from cycle_encoding.cli import main
from cycle_encoding.editing import interfacegan_direction, save_interfacegan
from cycle_encoding.errors import CycleEncodingError
from cycle_encoding.inversion import Inverter
from cycle_encoding.utils import save_image
from tests import test_hostile_inputs as hostile
from tests.conftest import make_tiny_generator

run64 = hostile.run64  # the module-scoped tuned run of three 64 px images
copy_run, one_error_line, tree = hostile.copy_run, hostile.one_error_line, hostile.tree


def cut(path: Path) -> None:
    """A file cut short, as by a full disk or an interrupted copy."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit(run: Path, direction: Path, *extra: str) -> int:
    return main(["edit", str(run), "--direction", str(direction), "--strengths", "0,1", "--quiet", *extra])


def test_export_and_convert_never_write_over_a_run_or_their_input(run64, tmp_path, capsys):
    run = copy_run(run64, tmp_path)
    delta = run / "images" / "im0" / "generator_delta.safetensors"
    before = tree(run)
    link = tmp_path / "link.safetensors"
    link.symlink_to(delta)
    of_run, is_input = "refused: a file of the inversion run", f"refused: it is the input {delta}"
    for argv, why in (
        (["export", str(run), "im0", "--format", "safetensors", "--out", str(delta)], is_input),
        (["export", str(run), "im0", "--format", "rosinality", "--out", str(delta)], is_input),
        (["export", str(run), "im0", "--out", str(link)], is_input),  # a link to the run's file is the run's file
        (["export", str(run), "im0", "--out", str(run / "images" / "im1" / "result.json")], of_run),
        (["convert", str(run64["G"]), str(run / "images" / "im1" / "generator_delta.safetensors")], of_run),
        (["report", str(run), "--out", str(run / "config.html")], of_run),  # would write RUN/config.json
    ):
        assert main(argv) == 2, argv
        assert why in one_error_line(capsys.readouterr().err), argv
    assert main(["convert", str(delta), str(delta)]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"error: DST {delta}: refused: it is the input {delta}; write the output elsewhere"
    )
    # the base generator is export's input too
    assert main(["export", str(run), "im0", "--out", str(run64["G"])]) == 2
    assert f"refused: it is the input {run64['G']}" in one_error_line(capsys.readouterr().err)
    assert tree(run) == before  # nothing of the run changed
    g = tmp_path / "g.safetensors"
    g.write_bytes(Path(run64["G"]).read_bytes())
    assert main(["convert", str(g), str(g)]) == 2
    assert "refused: it is the input" in capsys.readouterr().err
    # what the commands write by default, or outside the run's own files, is still written
    assert main(["export", str(run), "im0", "--format", "safetensors"]) == 0
    assert (run / "images" / "im0" / "tuned_generator.safetensors").is_file()
    assert main(["report", str(run), "--out", str(run / "again.html"), "--no-png"]) == 0


def test_one_corrupt_file_fails_its_image_only(run64, tmp_path, capsys):
    run = copy_run(run64, tmp_path)
    cut(run / "images" / "im0" / "target.png")
    assert edit(run, run64["direction"]) == 3  # as invert: some failed, the others done
    out = capsys.readouterr().out
    assert f"failed: im0: {run / 'images' / 'im0' / 'target.png'}: cannot read image" in out
    doc = json.loads((run / "edits" / "dir" / "edit.json").read_text())
    assert [r["name"] for r in doc["images"]] == ["im1", "im2"] and [f["name"] for f in doc["failed"]] == ["im0"]
    cut(run / "images" / "im1" / "recon_tune.png")
    cut(run / "edits" / "dir" / "im2" / "01_s+1.png")
    assert main(["report", str(run)]) == 3
    err = capsys.readouterr().err
    assert f"left out: im0: {run / 'images' / 'im0' / 'target.png'}: cannot read image" in err
    assert f"left out: im1: {run / 'images' / 'im1' / 'recon_tune.png'}: cannot read image" in err
    assert f"left out: edits/dir/im2: {run / 'edits' / 'dir' / 'im2' / '01_s+1.png'}: cannot read image" in err
    data = json.loads((run / "report.json").read_text())
    assert [it["name"] for it in data["per_image"]] == ["im2"]
    assert "im2" not in [r["name"] for r in data["edits"][0]["images"]]  # its edit left out, the image shown
    page = (run / "report.html").read_text()
    assert 'id="img-im2"' in page and 'data-edit="dir"><tbody>' not in page


def tiny_run_files(root: Path, names: list[str]) -> tuple[Path, Path]:
    """A tiny generator file, a direction file and one image per name in ``root / 'in'``."""
    G = make_tiny_generator(resolution=16)
    ce.save_generator(G, root / "G.safetensors")
    with torch.no_grad():
        imgs = G(torch.randn(len(names), G.z_dim, generator=torch.Generator().manual_seed(7)))
    (root / "in").mkdir(parents=True)
    for n, im in zip(names, imgs):
        ce.to_pil(im).save(root / "in" / f"{n}.png")  # not save_image: its temporary's name would be too long
    direction = root / "dir.pt"
    save_interfacegan(interfacegan_direction(torch.randn(G.w_dim, generator=torch.Generator().manual_seed(2))),
                      direction)  # fmt: skip
    return root / "G.safetensors", direction


def invert(generator: Path, images: Path, run: Path, steps: int = 1) -> dict:
    inv = Inverter(str(generator), None, stages=("project",), perceptual="none", device="cpu",
                   project={"steps": steps, "l2_lambda": 1.0, "perceptual_lambda": 0.0})  # fmt: skip
    return inv.run(images, run, log=lambda s: None)


def test_names_too_long_or_with_a_line_break_get_safe_folders(tmp_path, capsys):
    long, broken = "a" * 240, "line\nbreak"
    gen, direction = tiny_run_files(tmp_path, [long, broken])
    run = tmp_path / "run"
    s = invert(gen, tmp_path / "in", run)
    assert s["done"] == [long, broken] and s["failed"] == []
    assert s["folders"] == {long: folder_name(long), broken: folder_name(broken)}
    folders = sorted(p.name for p in (run / "images").iterdir() if p.is_dir())
    assert folders == sorted(s["folders"].values())
    assert all(len(f.encode()) <= NAME_BYTES and "\n" not in f for f in folders)
    assert len((run / "latents.txt").read_text().splitlines()) == 2  # one name a line
    for name, folder in s["folders"].items():
        assert json.loads((run / "images" / folder / "result.json").read_text())["original_name"] == name
    assert invert(gen, tmp_path / "in", run)["skipped"] == [long, broken]  # a re-run finds them finished
    assert edit(run, direction) == 0
    assert edit(run, direction, "--images", long, "--name", "by-name") == 0  # the name as given finds its folder
    found = InversionRun(run).find_images([long, folder_name(broken), long, broken])  # a name or its folder's
    assert found == [folder_name(long), folder_name(broken)]  # each folder once, also given by name and by folder
    with pytest.raises(CycleEncodingError, match=r"no finished image named 'nope' \(finished: .*line_break-"):
        InversionRun(run).find_images(["nope"])
    labels = {im.name: im.label for im in InversionRun(run).load_images()[0]}
    assert sorted(labels.values()) == sorted([long, "line\\nbreak"])  # shown as given, the line break escaped
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    data = json.loads((run / "report.json").read_text())
    assert sorted(it["label"] for it in data["per_image"]) == sorted(labels.values())
    assert "line\\nbreak" in (run / "report.html").read_text()


def test_edits_of_an_image_inverted_again_are_not_reported(tmp_path, capsys):
    gen, direction = tiny_run_files(tmp_path, ["im0", "im1"])
    run = tmp_path / "run"
    invert(gen, tmp_path / "in", run, steps=4)  # enough steps for the pivot to depend on the target
    assert edit(run, direction) == 0
    old = json.loads((run / "images" / "im0" / "result.json").read_text())["recon_sha256"]["project"]
    G = ce.load_generator(gen)
    with torch.no_grad():
        save_image(
            G(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(99)))[0], tmp_path / "in" / "im0.png"
        )
    assert invert(gen, tmp_path / "in", run, steps=4)["done"] == ["im0"]  # inverted again: its input changed
    assert json.loads((run / "images" / "im0" / "result.json").read_text())["recon_sha256"]["project"] != old
    capsys.readouterr()
    assert main(["report", str(run)]) == 0  # not an error: the edit is only out of date for im0
    data = json.loads((run / "report.json").read_text())
    assert [r["name"] for r in data["edits"][0]["images"]] == ["im1"] and data["edits"][0]["stale"] == ["im0"]
    assert "not shown: the edits of im0, made before the image was inverted again" in (run / "report.html").read_text()
    assert edit(run, direction) == 0  # the edit made again is of the new inversion: shown
    assert main(["report", str(run)]) == 0
    data = json.loads((run / "report.json").read_text())
    assert [r["name"] for r in data["edits"][0]["images"]] == ["im0", "im1"] and data["edits"][0]["stale"] == []


def test_edit_removes_what_a_killed_edit_left_and_refuses_a_link_out_of_the_run(run64, tmp_path, capsys):
    run = copy_run(run64, tmp_path)
    edits = run / "edits"
    stale = edits / ".dir.k1lled00.tmp"  # what SIGTERM during `edit --name dir` leaves: Python runs no cleanup
    (stale / "im0").mkdir(parents=True)
    np.save(stale / "im0" / "half.npy", np.zeros(3))
    other = edits / ".other.r4nning0.tmp"  # another edit's, still being rendered
    other.mkdir()
    with lock(other) as taken:
        assert taken
        assert edit(run, run64["direction"], "--name", "again") == 0
        assert not stale.exists() and other.is_dir()
    assert sorted(p.name for p in edits.iterdir()) == [".other.r4nning0.tmp", "again"]
    assert edit(run, run64["direction"]) == 0  # no live edit holds it now
    assert sorted(p.name for p in edits.iterdir()) == ["again", "dir"]
    outside = tmp_path / "outside"
    outside.mkdir()
    (edits / "linked").symlink_to(outside, target_is_directory=True)
    capsys.readouterr()
    assert edit(run, run64["direction"], "--name", "linked") == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"error: {edits / 'linked'}: refused: it leads outside the run folder (a symbolic link): remove it"
    )
    assert os.listdir(outside) == [] and not list(edits.glob(".linked.*"))
    assert edit(run, run64["direction"], "--out", str(run / "images" / "im0")) == 2
    assert "refused: a file of the inversion run" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("name", ["plain-name_1.2", "a" * NAME_BYTES, "é" * 50])
def test_safe_names_keep_their_folder(name):
    assert folder_name(name) == name
