"""Config: YAML + overrides -> typed dataclasses; every user error names its key."""

from pathlib import Path

import pytest
import yaml
from conftest import tiny_config_dict

from ldm_pipeline.config import (
    FIXED,
    FREE,
    REAPPLIED,
    Config,
    ConfigError,
    fields_with,
    load_config,
    setting_fields,
    stage_settings,
)


def write(tmp_path, data) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def base(tmp_path, caption_folder):
    return tiny_config_dict(tmp_path / "out", caption_folder)


def test_loads_yaml_with_defaults_and_overrides(tmp_path, base):
    config = load_config(write(tmp_path, base), ["learning_rate=3e-4", "data.caption_dropout=0.2",
                                                 "validation.prompts=[a, b]", "snr_gamma=null"])
    assert isinstance(config, Config)
    assert config.learning_rate == pytest.approx(3e-4) and isinstance(config.learning_rate, float)
    assert config.data.caption_dropout == 0.2
    assert config.validation.prompts == ["a", "b"]
    assert config.snr_gamma is None
    assert config.adam_beta2 == 0.999  # a default from code


def test_yaml_no_is_a_string_not_false(tmp_path, base):
    base_text = yaml.safe_dump(base) + "mixed_precision: no\n"
    path = tmp_path / "run.yaml"
    path.write_text(base_text)
    assert load_config(path).mixed_precision == "no"
    assert load_config(path, ["mixed_precision=no", "use_ema=true"]).use_ema is True


def test_yaml_scientific_notation_string_is_a_float(tmp_path, base):
    base["learning_rate"] = "1e-4"  # YAML 1.1 reads 1e-4 (no dot) as a string
    assert load_config(write(tmp_path, base)).learning_rate == pytest.approx(1e-4)


@pytest.mark.parametrize("change, key", [
    ({"learnin_rate": 1e-4}, "learnin_rate"),
    ({"data": {"train_data_dir": "x", "caption_colum": "t"}}, "data.caption_colum"),
    ({"train_batch_size": "four"}, "train_batch_size"),
    ({"train_batch_size": 2.5}, "train_batch_size"),
    ({"use_ema": "yes"}, "use_ema"),
    ({"mixed_precision": "fp8"}, "mixed_precision"),
    ({"stages": ["unet", "decoder"]}, "stages[1]"),
    ({"resolution": 60}, "resolution"),
    ({"max_train_steps": 0}, "max_train_steps"),
    ({"distributed_timeout": 0}, "distributed_timeout"),
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"stages": ["unet", "vae"]}, "stages"),
    ({"validation": {"prompts": "a red circle"}}, "validation.prompts"),
    ({"data": {"train_data_dir": "/definitely/not/here"}}, "data.train_data_dir"),
    ({"data": {"train_data_dir": None}}, "data"),
    ({"data": {"caption_dropout": 1.5}}, "data.caption_dropout"),
    ({"data": {"caption_template": "a photo"}}, "data.caption_template"),
    ({"data": {"cache_latents": True, "center_crop": False}}, "data.cache_latents"),
    ({"sampling": {"guidance_scale": -3.0}}, "sampling.guidance_scale"),
    ({"sampling": {"guidance_rescale": 1.5}}, "sampling.guidance_rescale"),
    ({"rescale_betas_zero_terminal_snr": True, "prediction_type": "epsilon"}, "rescale_betas_zero_terminal_snr"),
    ({"vae_training": {"decoder_steps": -1}}, "vae_training.decoder_steps"),
    ({"vae_training": {"decoder_noise": 0.0}}, "vae_training.decoder_noise"),
    ({"vae_training": {"decoder_learning_rate": 0.0}}, "vae_training.decoder_learning_rate"),
])
def test_bad_values_name_their_key(tmp_path, base, change, key):
    for name, value in change.items():
        if isinstance(value, dict) and isinstance(base.get(name), dict):
            base[name] = {**base[name], **value}
        else:
            base[name] = value
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, base))
    assert key in str(error.value)


def test_output_dir_that_is_a_file_is_refused(tmp_path, base):
    (tmp_path / "taken").write_text("not a directory")
    base["output_dir"] = str(tmp_path / "taken")
    with pytest.raises(ConfigError, match="output_dir.*is a file"):
        load_config(write(tmp_path, base))


def test_missing_config_file_and_bad_override(tmp_path, base):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(write(tmp_path, base), ["learning_rate"])
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        load_config(write(tmp_path, base), ["bogus=1"])


def test_shipped_configs_load(monkeypatch):
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    configs = sorted((root / "train_configs").glob("*.yaml"))
    assert configs, "train_configs/ holds the example configs"
    for path in configs:
        data = yaml.safe_load(path.read_text())
        assert len(path.read_text().splitlines()) <= 60, f"{path.name}: keep configs short"
        # Data folders are made on demand; validate the rest as if they existed.
        data.setdefault("data", {}).setdefault("make_shapes", data["data"].get("make_shapes") or {})
        load_config(path, [f"data.make_shapes={data['data']['make_shapes']}"])


def test_packaged_configs_load_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no train_configs/ here
    config = load_config("shapes", ["data.train_data_dir=data/shapes"])
    assert config.data.make_shapes.num_images == 6000 and config.output_dir == "outputs/shapes"
    assert load_config("shapes.yaml").resolution == config.resolution
    with pytest.raises(ConfigError, match="name of a packaged config: folder128, folder_cpu, sd15_finetune, .*shapes"):
        load_config("shape")
    (tmp_path / "images").mkdir()
    (tmp_path / "shapes.yaml").write_text("resolution: 32\ndata: {train_data_dir: images}\n")
    assert load_config("shapes.yaml").resolution == 32  # a file of that name comes first


def test_every_setting_says_what_a_resume_does_with_it():
    """A new field must be classified (fields_with reads the metadata): fixed, re-applied or free."""
    policies = {key: item.metadata.get("resume") for key, item in setting_fields()}
    unclassified = [key for key, policy in policies.items() if policy not in (FIXED, REAPPLIED, FREE)]
    assert unclassified == []
    assert len(list(setting_fields())) > 80  # the walk reaches into every section
    fixed = fields_with(FIXED)
    assert {"seed", "model.unet", "data.train_data_dir", "lora.rank", "validation.num_heldout"} <= set(fixed)
    assert "learning_rate" in fields_with(REAPPLIED) and "learning_rate" not in fixed
    assert set(fields_with(cache_key=True)) == {"resolution", "data.center_crop", "data.random_flip"}


def test_each_stage_reapplies_its_own_settings_and_the_shared_ones():
    config = Config(stages=["vae", "unet"])
    vae, unet = stage_settings(config, "vae"), stage_settings(config, "unet")
    assert "vae_training.learning_rate" in vae.reapplied_keys and "learning_rate" not in vae.reapplied_keys
    assert "learning_rate" in unet.reapplied_keys and "vae_training.learning_rate" not in unet.reapplied_keys
    for shared in ("adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon"):
        assert vae.reapplied_keys.count(shared) == unet.reapplied_keys.count(shared) == 1
    assert unet.log_offset == config.vae_training.max_train_steps and vae.checkpoint_prefix == "vae-"
