import pytest

from transrec.config import Config, ConfigError, load_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_dotted_overrides_fill_typed_sections(tmp_path):
    path = write(tmp_path, "name: a\ntrain: {epochs: 3, lr: 1}\nmodel: {text: {trainable_blocks: 1}}\n")
    cfg = load_config(path, ["train.zero_stage=3", "eval.ks=[1, 5]", "model.text.config.hidden_size=16"])
    assert isinstance(cfg, Config)
    assert (cfg.name, cfg.train.epochs, cfg.train.zero_stage, cfg.eval.ks) == ("a", 3, 3, [1, 5])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # an int is a valid float
    assert cfg.model.text.trainable_blocks == 1 and cfg.model.text.config == {"hidden_size": 16}
    assert cfg.model.image.name == "resnet18"  # untouched defaults stay


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = write(tmp_path, "train: {epochz: 3}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*unknown key 'train\.epochz'"):
        load_config(path)


def test_unknown_override_key_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'model\.text\.layerz'"):
        load_config(write(tmp_path, "{}"), ["model.text.layerz=2"])


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.epochs must be int, got str 'many'"):
        load_config(write(tmp_path, "train: {epochs: many}\n"))
    with pytest.raises(ConfigError, match=r"train\.epochs must be int, got bool"):
        load_config(write(tmp_path, "{}"), ["train.epochs=true"])
    assert load_config(write(tmp_path, "{}"), ["cluster.use_gpu=true"]).cluster.use_gpu == "true"  # a switch
    with pytest.raises(ConfigError, match=r"model must be a mapping"):
        load_config(write(tmp_path, "model: 3\n"))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1,\n"))
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(write(tmp_path, "{}"), ["train.epochs"])


def test_shipped_configs_load():
    from pathlib import Path

    for path in (Path(__file__).parents[1] / "configs").glob("*.yaml"):
        load_config(path)
