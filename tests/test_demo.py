"""`make demo` in miniature: one generator update per phase, a few samples; the full run is `make demo`."""

import json
import logging

import pytest
import torch

from diffusers_pdmd import demo, digits


pytestmark = pytest.mark.skipif(
    not (digits.ASSET_DIR / "model_index.json").is_file(), reason="the shipped digits teacher is missing"
)


def test_demo_writes_grid_and_table(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="diffusers_pdmd.hub"):
        result = demo.run(tmp_path, steps=1, per_prompt=2, grid_seeds=2)
    # Three students of one local teacher: its local path is warned about once, not once per student.
    local = [r for r in caplog.records if "by the local path" in r.getMessage()]
    assert len(local) == 1 and str((tmp_path / "teacher").resolve()) in local[0].getMessage()
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert list(rows) == ["teacher", "phased_dmd", "sgts", "dmd"]
    assert [rows[m]["nfe"] for m in rows] == [60, 4, 4, 1]
    assert rows["teacher"]["accuracy"] >= 0.8  # a real teacher: its digits are recognisable
    assert rows["teacher"]["fd_to_teacher"] == pytest.approx(0.0, abs=1e-3)
    for m in ("phased_dmd", "sgts", "dmd"):
        assert (tmp_path / m / "phased_dmd_config.json").is_file()
        assert rows[m]["relative_nfe"] < 0.1
    from PIL import Image

    grid = Image.open(tmp_path / "grid.png")
    # 4 models x 2 seeds rows + 3 separator rows of 16x16 images, 10 columns, 1-pixel borders, scale 3, plus labels
    assert grid.width > 3 * (10 * 17 + 1) and grid.height > 3 * (11 * 17 + 1)
    table = (tmp_path / "metrics.md").read_text()
    assert "Phased DMD" in table and result["seconds"] > 0
    assert f"CFG {digits.TRUE_CFG_SCALE:g}" in table  # the scale the teacher was sampled with
    torch.testing.assert_close(torch.tensor(rows["dmd"]["nfe"]), torch.tensor(1))


def test_grid_labels_models_and_digits(tmp_path):
    import numpy as np
    from PIL import Image

    from diffusers_pdmd import metrics

    images, labels = metrics.real_digits("test")
    seeds = 2
    models = dict.fromkeys(["teacher", "phased_dmd", "sgts", "dmd"], (images, 1.0, 1))
    demo.grid(models, labels, seeds, tmp_path / "grid.png")
    labelled = np.asarray(Image.open(tmp_path / "grid.png").convert("L")).astype(int)
    order = torch.cat([torch.nonzero(labels == d)[:seeds, 0] for d in range(10)])
    block = images[order].view(10, seeds, 3, 16, 16).transpose(0, 1).reshape(-1, 3, 16, 16)
    blank = torch.zeros(10, 3, 16, 16)
    digits.save_grid(torch.cat([block, blank] * 3 + [block]), tmp_path / "plain.png", nrow=10, scale=3)
    plain = np.asarray(Image.open(tmp_path / "plain.png").convert("L")).astype(int)
    top, left = labelled.shape[0] - plain.shape[0], labelled.shape[1] - plain.shape[1]
    assert top > 0 and left > 0
    np.testing.assert_array_equal(labelled[top:, left:], plain)  # the images are untouched, below and right
    cell = 17 * 3
    for d in range(10):  # a digit (dark ink on white) above each column
        assert (labelled[:top, left + d * cell : left + (d + 1) * cell] < 128).any(), d
    for k in range(4):  # a name left of each model's block, none left of the blank rows between blocks
        rows = labelled[top + k * (seeds + 1) * cell : top + (k * (seeds + 1) + seeds) * cell, :left]
        assert (rows < 128).any(), k
        if k < 3:
            gap = labelled[top + (k * (seeds + 1) + seeds) * cell + 3 : top + (k + 1) * (seeds + 1) * cell, :left]
            assert (gap >= 128).all(), k
