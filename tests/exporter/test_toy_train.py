"""The toy's training script saves only a checkpoint that passed its quality bars (the full
training takes minutes; these run one step, which never passes)."""

from __future__ import annotations

import pytest

from exporter.toy.train import main, replace_directory


def test_a_checkpoint_below_the_bars_is_not_saved(tmp_path, capsys):
    out = tmp_path / "checkpoint"
    out.mkdir()
    (out / "config.json").write_text("the committed checkpoint")
    assert main(["--out", str(out), "--steps", "1", "--train-images", "64", "--batch-size", "8",
                 "--held-out", "10"]) == 1
    assert "below the acceptance bars" in capsys.readouterr().out
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert (out / "config.json").read_text() == "the committed checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no staging left beside it


def test_replace_directory(tmp_path, monkeypatch):
    out, new = tmp_path / "ckpt", tmp_path / "new"
    out.mkdir()
    (out / "w").write_text("old")
    new.mkdir()
    (new / "w").write_text("new")
    replace_directory(new, out)
    assert (out / "w").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

    other = tmp_path / "other"
    other.mkdir()
    real_rename = type(other).rename

    def failing(self, target):
        if self == other:
            raise OSError(28, "No space left on device")
        return real_rename(self, target)

    monkeypatch.setattr(type(other), "rename", failing)
    with pytest.raises(OSError, match="No space"):
        replace_directory(other, out)
    assert (out / "w").read_text() == "new"  # the previous checkpoint came back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "other"]
