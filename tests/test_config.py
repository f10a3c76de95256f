import pytest

from transrec.config import Config, ConfigError, load_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_dotted_overrides_fill_typed_sections(tmp_path):
    path = write(tmp_path, "name: a\ntrain: {epochs: 3, lr: 1}\nmodel: {text: {trainable_blocks: 1}}\n")
    cfg = load_config(path, ["train.zero_stage=3", "eval.ks=[1, 10]", "model.text.config.hidden_size=16"])
    assert isinstance(cfg, Config)
    assert (cfg.name, cfg.train.epochs, cfg.train.zero_stage, cfg.eval.ks) == ("a", 3, 3, [1, 10])
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


def test_presets_ship_in_the_package_and_load_by_name(tmp_path):
    from transrec.config import preset_names

    assert {"tiny", "demo", "ml100k-id", "ml100k-twostage", "ml100k-text", "ml100k-mom"} <= set(preset_names())
    for name in preset_names():
        assert load_config(name, [f"name={name}-run"]).name == f"{name}-run"
    with pytest.raises(ConfigError, match="config file not found: nope.yaml \\(nor a preset: demo, "):
        load_config("nope.yaml")
    local = write(tmp_path, "name: mine\n")  # a file wins over a preset
    assert load_config(local).name == "mine"


@pytest.mark.parametrize(("override", "message"), [
    ("model.loss=foo", r"model\.loss must be one of 'softmax', 'bce', got 'foo'"),
    ("model.negatives=everything", r"model\.negatives must be one of 'inbatch', 'catalogue', 'bank', 'mixed'"),
    ("train.zero_stage=5", r"train\.zero_stage must be one of 0, 1, 2, 3, got 5"),
    ("train.batch_size=-4", r"train\.batch_size must be > 0, got -4"),
    ("model.dropout=1.5", r"model\.dropout must be in \[0, 1\), got 1\.5"),
    ("data.train_window=sometimes", r"data\.train_window must be one of 'stride', 'random', 'last'"),
    ("data.video_decoder=opencv", r"data\.video_decoder must be one of 'auto', 'dali', 'pyav', got 'opencv'"),
    ("model.video.temporal=lstm", r"model\.video\.temporal must be one of 'mean', 'transformer', got 'lstm'"),
    ("model.video.frames=0", r"model\.video\.frames must be > 0, got 0"),
    ("model.features_head=deep", r"model\.features_head must be one of 'linear', 'mlp', got 'deep'"),
    ("model.heads=3", r"model\.dim \(64\) must be a multiple of model\.heads \(3\)"),
    ("model.negatives=mixed", r"model\.negatives mixed needs model\.sampled_negatives >= 1"),
    ("model.text.cache_frozen=true", r"model\.text\.cache_frozen works with train\.zero_stage 1 or 2, not 3"),
    ("model.loss=bce", r"model\.user_encoder bert4rec trains by cloze with model\.loss softmax, not bce"),
    ("model.attention=bidirectional", r"model\.attention bidirectional needs a Transformer model\.user_encoder \(sasrec, bert4rec\): gru4rec"),
    ("model.text.pooling=max", r"model\.text\.pooling must be one of 'mean', 'cls', 'last', got 'max'"),
    ("model.text.item_token=-2", r"model\.text\.item_token must be >= -1, got -2"),
    ("model.text.item_token=5", r"model\.text\.item_token needs model\.text\.pooling last \(its state is the item's vector\), not mean"),
    ("train.finetune_mode=qlora", r"train\.finetune_mode must be one of '', 'full', 'top_k', 'adapters', 'lora', got 'qlora'"),
    ("train.lora_r=0", r"train\.lora_r must be > 0, got 0"),
    ("train.lora_dropout=1.0", r"train\.lora_dropout must be in \[0, 1\), got 1\.0"),
    ("train.finetune_blocks=0", r"train\.finetune_mode lora needs train\.finetune_blocks != 0"),
    ("eval.select_metric=ndcg@7", r"eval\.select_metric must be a metric of eval\.ks \(hr@5, hr@10, hr@20, ndcg@5, "
                                  r"ndcg@10, ndcg@20\), got 'ndcg@7'"),
    ("train.offload_params=true", r"train\.offload_params needs train\.zero_stage 3 \(the stage that partitions parameters\), not 2"),
])
def test_bad_values_name_their_key_when_the_config_loads(tmp_path, override, message):
    base = {"cache_frozen": "train: {zero_stage: 3}\n", "attention": "model: {user_encoder: gru4rec}\n",
            "loss=bce": "model: {user_encoder: bert4rec}\ndata: {num_negatives: 1}\n",
            "finetune_blocks": "train: {finetune_mode: lora}\n"}
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, next((v for k, v in base.items() if k in override), "{}")), [override])
