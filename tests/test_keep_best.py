"""train.keep best_val: the export holds the weights of the best validation metric, the final evaluation included;
a kill between the two renames of a new best is repaired; bad settings fail in one line."""
import json
import os

import pytest
import torch

from larp.core.errors import ConfigError
from larp.models.generator import load_generator
from larp.training import keep_best
from larp.training.ar_stage import ARStage
from larp.training.config_build import build_config
from tests.conftest import ROOT
from tests.test_train import ar_argv, run_main, synth  # noqa: F401 (synth is a fixture)


def scripted_val_loss(monkeypatch, values):
    """ARStage.val_loss returns `values` in turn and records the weights it was asked about."""
    seen = []

    def fake(self, model, videos, cond):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return values[len(seen) - 1]
    monkeypatch.setattr(ARStage, "val_loss", fake)
    return seen


@pytest.mark.parametrize("values, best_index", [([5.0, 3.0, 4.0, 4.5], 1), ([5.0, 4.0, 3.5, 3.0], 3)])
def test_export_holds_the_best_evaluation(synth, reference_dir, tmp_path, monkeypatch, values, best_index):
    seen = scripted_val_loss(monkeypatch, values)  # evaluations at steps 2, 4, 6 and the final one at 8
    summary = run_main(ar_argv(synth, reference_dir, tmp_path, "keep", 8,
                               extra=["eval.interval", "2", "train.keep", "best_val"]))
    assert len(seen) == 4
    with open(os.path.join(summary["run_dir"], "finished.json")) as f:
        kept = json.load(f)["kept"]
    assert kept == {"rule": "best_val", "step": 2 * (best_index + 1), "metric": "val_loss", "value": values[best_index]}
    exported = load_generator(summary["export"]).state_dict()
    for k, v in exported.items():
        assert torch.equal(v, seen[best_index][k]), k
    assert sorted(os.listdir(summary["export"])) == ["config.json", "model.safetensors"]  # the export layout only
    if best_index != 3:  # the last weights differ, so the export really is the earlier step's
        assert any(not torch.equal(v, seen[3][k]) for k, v in exported.items())


def test_keep_last_exports_the_last_weights(synth, reference_dir, tmp_path, monkeypatch):
    seen = scripted_val_loss(monkeypatch, [1.0, 9.0])
    summary = run_main(ar_argv(synth, reference_dir, tmp_path, "last", 4, extra=["eval.interval", "2", "train.keep",
                                                                                "last"]))
    exported = load_generator(summary["export"]).state_dict()
    assert all(torch.equal(v, seen[1][k]) for k, v in exported.items())
    assert not os.path.exists(os.path.join(summary["run_dir"], "best"))


def test_keep_defaults_to_last():
    from larp.training.config import TrainConfig
    assert TrainConfig().keep == "last"


@pytest.mark.parametrize("left", ["best.next", "best.prev"])
def test_a_swap_killed_half_way_is_repaired(tmp_path, left):
    folder = tmp_path / left
    folder.mkdir()
    (folder / "best.json").write_text(json.dumps({"step": 6, "metric": "val_loss", "value": 2.5}))
    assert keep_best.read_best(str(tmp_path))["step"] == 6
    assert (tmp_path / "best" / "best.json").exists() and not folder.exists()


def test_an_incomplete_next_is_ignored(tmp_path):
    (tmp_path / "best.next").mkdir()  # killed before its best.json: the old best stays
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "best.json").write_text(json.dumps({"step": 2, "metric": "val_loss", "value": 3.0}))
    assert keep_best.read_best(str(tmp_path))["step"] == 2


def test_bad_keep_settings_fail_in_one_line():
    with pytest.raises(ConfigError, match="train.keep: 'best' is not last or best_val"):
        build_config(str(ROOT / "cfgs/quickstart_nar.yaml"), opts=["train.keep", "best"])
    with pytest.raises(ConfigError, match="train.keep: best_val needs a validation set"):
        build_config(str(ROOT / "cfgs/quickstart_nar.yaml"), opts=["train.keep", "best_val", "data.val_csv", "null"])
