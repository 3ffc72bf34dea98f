"""Hostile-but-fair inputs, continued (tests/test_hostile_inputs.py is at its size limit): issue 29's values out of
any sensible range, oversized inputs, file-level mistakes. Each has one exact outcome: exit status and one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import save_file

import cycle_encoding as ce
from cycle_encoding.checkpoints.native import META_KEY
from cycle_encoding.cli import main
from tests.conftest import make_tiny_generator


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    G = make_tiny_generator(resolution=16)
    ce.save_generator(G, d / "g.safetensors")
    return d


def test_a_string_where_an_architecture_number_goes_is_one_line(tiny, tmp_path, capsys):
    """A file whose configuration says style_dim "32", and the API given one: the field named, not torch's 4 lines."""
    with safe_open(tiny / "g.safetensors", "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    doc = json.loads(meta[META_KEY])
    doc["config"]["style_dim"] = "32"
    save_file(tensors, tmp_path / "bad.safetensors", {META_KEY: json.dumps(doc)})
    assert main(["generate", "-g", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert one_error_line(capsys.readouterr().err).endswith("style_dim must be an integer, got '32'")
    with pytest.raises(ValueError, match=r"^style_dim must be an integer, got '512'$"):
        ce.GeneratorConfig(style_dim="512")
    assert ce.GeneratorConfig(resolution=np.int64(64)).resolution == 64  # numpy integers still do
