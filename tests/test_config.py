"""Config loading: partial sections keep their declared defaults; bad values, empty / non-UTF-8 files
and `--set` typos stop with one line naming the key and where it came from, before anything runs."""

import pytest

from iak_dist.cli import main
from iak_dist.config import FinetuneConfig, load_config
from iak_dist.errors import UserError

FINETUNE_DEFAULTS = FinetuneConfig().optim


def test_a_partial_section_keeps_its_own_defaults(tmp_path):
    by_override = load_config(None, ["finetune.optim.batch_size=256"]).finetune.optim
    path = tmp_path / "partial.yaml"
    path.write_text("finetune:\n  optim:\n    batch_size: 256\n")
    by_file = load_config(path).finetune.optim
    for optim in (by_override, by_file):
        assert optim.batch_size == 256
        # the fine-tune section's own defaults (3 epochs, lr 2e-3), not a plain OptimConfig's (2, 1e-3)
        assert (optim.epochs, optim.lr_dense) == (FINETUNE_DEFAULTS.epochs, FINETUNE_DEFAULTS.lr_dense) == (3.0, 2e-3)


def test_an_override_keeps_the_files_other_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("finetune:\n  optim:\n    epochs: 5\n")
    optim = load_config(path, ["finetune.optim.lr_dense=0.01"]).finetune.optim
    assert (optim.epochs, optim.lr_dense, optim.batch_size) == (5.0, 0.01, FINETUNE_DEFAULTS.batch_size)


def run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("override, message", [
    ("pretrain.epochs=0", "key pretrain.epochs: must be > 0 (or give steps > 0), got 0.0"),
    ("pretrain.steps=-3", "key pretrain.steps: must be >= 0, got -3"),
    ("finetune.optim.batch_size=0", "key finetune.optim.batch_size: must be >= 1, got 0"),
    ("evaluate.batch_size=-8", "key evaluate.batch_size: must be >= 1, got -8"),
    ("pretrain.lr_dense=.nan", "key pretrain.lr_dense: must be >= 0, got nan"),
    ("finetune.iak.compression_fraction=1.5", "key finetune.iak.compression_fraction: must be within [0, 1]"),
    ("distributed.zero.stage=4", "key distributed.zero.stage: must be 0, 1, 2 or 3, got 4"),
    ("model.tower=[]", "key model.tower: need at least one layer"),
])
def test_out_of_range_values_are_named_before_anything_runs(override, message, capsys, tmp_path):
    code, err = run_cli(["pipeline", "run", "configs/movielens_age.yaml", "--set", f"run_dir={tmp_path / 'run'}",
                         "--set", override], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"error: --set {override}: {message}")
    assert not (tmp_path / "run").exists()


def test_a_set_typo_is_named_as_the_set_with_the_closest_key(capsys, tmp_path):
    code, err = run_cli(["pipeline", "run", "configs/movielens_age.yaml", "--set", f"run_dir={tmp_path / 'run'}",
                         "--set", "finetune.optim.bacth_size=64"], capsys)
    assert code == 2
    assert err[0].startswith("error: --set finetune.optim.bacth_size=64: unknown key finetune.optim.bacth_size "
                             "(did you mean batch_size?); valid keys here: epochs, steps, batch_size")
    assert "movielens_age.yaml" not in err[0]  # the file is fine: the error is the --set's


def test_a_file_typo_names_the_file_and_the_closest_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pretrain:\n  batchsize: 64\n")
    with pytest.raises(UserError, match=rf"^{path}: key pretrain.batchsize: unknown key \(did you mean batch_size\?\)"):
        load_config(path, ["pretrain.epochs=1"])


def test_an_empty_config_file_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it used to prepare MovieLens and run every default here
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    code, err = run_cli(["pipeline", "run", str(path), "--no-ray"], capsys)
    assert (code, len(err)) == (2, 1)
    assert err[0] == (f"error: config {path}: the file is empty; start from one in configs/, "
                      "e.g. configs/movielens_age.yaml")
    assert list(tmp_path.iterdir()) == [path]


def test_a_config_that_is_not_utf8_is_one_line(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run_dir: runs/caf\xe9\n".encode("latin-1"))
    code, err = run_cli(["pipeline", "run", str(path)], capsys)
    assert (code, len(err)) == (2, 1)
    assert err[0] == f"error: config {path}: not UTF-8 text (byte 17); save it as UTF-8 YAML"


def test_a_model_section_that_differs_from_the_backbones_is_named(backbone_dir, tmp_path, capsys):
    """Fine-tuning builds the model from backbone.json: a config that says otherwise must not pass silently."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(backbone_dir, run_dir / "seed0" / "backbone")
    code, err = run_cli(["finetune", "configs/movielens_age.yaml", "--strategy", "head", "--seed", "0",
                         "--set", f"run_dir={run_dir}", "--set", "model.tower=[32, 16]",
                         "--set", "model.embedding_dim=12"], capsys)
    assert code == 2 and err[0].startswith("[iak-dist] torch")  # the stack line, then the one error
    backbone = run_dir / "seed0" / "backbone"
    assert err[1:] == [f"error: model.embedding_dim: the config says 12, the backbone in {backbone} "
                      "was pre-trained with 8; use the backbone's value or pre-train again (another run_dir)"]
    assert not (run_dir / "seed0" / "adapters").exists()


def test_a_strategy_is_one_file_its_settings_found_through_the_registry(tmp_path, monkeypatch):
    """A strategy registered from its own module (config class included) is a valid `finetune.strategies`
    name, its section is validated with its own defaults and checks, and round-trips through to_dict."""
    from dataclasses import dataclass

    from iak_dist.config import at_least, to_dict
    from iak_dist.model.strategies import base
    from iak_dist.model.strategies.iak import IakConfig

    @dataclass
    class ToyConfig:
        size: int = 3
        """A knob."""

        def problems(self):
            return at_least(self, size=1)

    class Toy(base.Adapter):
        name = "toy"
        config_class = ToyConfig

    monkeypatch.setitem(base._REGISTRY, "toy", Toy)
    path = tmp_path / "c.yaml"
    path.write_text("finetune:\n  strategies: [toy, iak]\n  toy:\n    size: 5\n")
    cfg = load_config(path)
    assert cfg.finetune.toy == ToyConfig(size=5) and cfg.finetune.iak == IakConfig()  # untouched: its defaults
    assert load_config(path, ["finetune.toy.size=7"]).finetune.toy.size == 7
    assert to_dict(cfg.finetune)["toy"] == {"size": 5}
    assert load_config(None, []).finetune.toy == ToyConfig()  # every registered strategy has its section
    with pytest.raises(UserError, match=r"^--set finetune.toy.sise=2: unknown key finetune.toy.sise "
                                        r"\(did you mean size\?\); valid keys here: size$"):
        load_config(path, ["finetune.toy.sise=2"])
    with pytest.raises(UserError, match=r"^--set finetune.toy.size=0: key finetune.toy.size: must be >= 1, got 0$"):
        load_config(path, ["finetune.toy.size=0"])
    with pytest.raises(UserError, match=r"^--set finetune.full.lr=1: strategy full has no settings$"):
        load_config(path, ["finetune.full.lr=1"])
