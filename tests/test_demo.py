"""`make demo` in miniature: one generator update per phase, a few samples; the full run is `make demo`."""

import json

import pytest
import torch

from diffusers_pdmd import demo, digits


pytestmark = pytest.mark.skipif(
    not (digits.ASSET_DIR / "model_index.json").is_file(), reason="the shipped digits teacher is missing"
)


def test_demo_writes_grid_and_table(tmp_path):
    result = demo.run(tmp_path, steps=1, per_prompt=2, grid_seeds=2)
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
    # 4 models x 2 seeds rows + 3 separator rows of 16x16 images, 10 columns, 1-pixel borders, scale 3
    assert grid.size == (3 * (10 * 17 + 1), 3 * (11 * 17 + 1))
    assert "Phased DMD" in (tmp_path / "metrics.md").read_text() and result["seconds"] > 0
    torch.testing.assert_close(torch.tensor(rows["dmd"]["nfe"]), torch.tensor(1))
