"""--progress auto|bar|lines|none: bars (with totals and time left) only where a terminal shows them; logs get lines."""

from __future__ import annotations

import io

import cycle_encoding as ce
from cycle_encoding.cli import main
from cycle_encoding.progress import Progress, resolve_progress
from tests.conftest import make_tiny_generator


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_modes_and_what_each_writes(monkeypatch):
    assert resolve_progress("auto", Tty()) == "bar" and resolve_progress("auto", io.StringIO()) == "lines"
    assert resolve_progress(False) == "none" and resolve_progress("none", Tty()) == "none"
    bar = Tty()
    with Progress(4, "work", "img", "auto", stream=bar) as p:
        for _ in range(4):
            p.update(1)
    text = bar.getvalue()
    assert "\r" in text and "4/4" in text  # a bar with its total, redrawn in place
    log = io.StringIO()
    with Progress(4, "work", "img", "auto", stream=log) as p:
        p.update(1)
        p.say("image 1 done")
    assert log.getvalue() == "image 1 done\n"  # no redraws in a log
    # lines with a heartbeat: how far, and the time left from the rate so far
    clock = iter([0.0, 10.0, 10.0, 10.0, 10.0])
    monkeypatch.setattr("cycle_encoding.progress.time.perf_counter", lambda: next(clock))
    log = io.StringIO()
    p = Progress(4, "work", "img", "lines", stream=log, heartbeat=5)
    p.update(1)
    assert log.getvalue() == "work: 1/4 img, 0:10 elapsed, about 0:30 left\n"


def test_generate_log_has_no_redraws_and_a_terminal_gets_a_bar(tmp_path, capsys):
    G = make_tiny_generator(resolution=16)
    ce.save_generator(G, tmp_path / "g.safetensors")
    args = ["generate", "-g", str(tmp_path / "g.safetensors"), "--seeds", "0-2", "--out", str(tmp_path / "o")]
    assert main([*args, "--progress", "lines"]) == 0
    assert "\r" not in capsys.readouterr().err
    assert main([*args, "--progress", "bar"]) == 0
    err = capsys.readouterr().err
    assert "\r" in err and "3/3" in err
    assert len(list((tmp_path / "o").glob("seed*.png"))) == 3
