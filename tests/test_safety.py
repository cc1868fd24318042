"""Loading never runs code from a file: weights are safetensors only, configs are plain YAML, and no
`trust_remote_code`. Pickle is only ever met in Accelerate's training state inside checkpoints."""

import ast
import pickle
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config, tiny_config_dict
from test_bad_input import assert_one_error_line, pickled_unet_dir

import ldm_pipeline
from ldm_pipeline.config import ConfigError, load_config
from ldm_pipeline.models import PICKLE_SUFFIXES
from ldm_pipeline.pipeline import load_pipeline
from ldm_pipeline.training import main as train_main
from ldm_pipeline.training import train

# Accelerate's save_state: optimizer / LR-scheduler / sampler state, RNG states, and the objects we
# register (LR schedule, EMA). Training state, not model weights: the models are model*.safetensors.
TRAINING_STATE = re.compile(r"(optimizer|scheduler|sampler)(_\d+)?\.bin|(random_states|custom_checkpoint)_\d+\.pkl")


class Trap:
    """Unpickling this creates `marker`: a file that shows pickled code was run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def booby_trap(weights: Path, marker: Path) -> None:
    weights.write_bytes(pickle.dumps({"conv_in.weight": Trap(marker)}))


def test_a_trained_run_holds_model_weights_only_as_safetensors(trained_run):
    for folder in ("pipeline", "vae"):
        files = [p for p in (trained_run / folder).rglob("*") if p.is_file()]
        assert not [p for p in files if p.suffix in PICKLE_SUFFIXES], folder
        assert any(p.suffix == ".safetensors" for p in files)
    checkpoints = sorted((trained_run / "checkpoints").iterdir())
    assert checkpoints
    for checkpoint in checkpoints:
        names = sorted(p.name for p in checkpoint.iterdir())
        assert "model.safetensors" in names, names
        pickled = [name for name in names if Path(name).suffix in PICKLE_SUFFIXES]
        assert all(TRAINING_STATE.fullmatch(name) for name in pickled), pickled


def test_a_pickled_unet_is_refused_not_unpickled(tmp_path, caption_folder):
    unet_dir = pickled_unet_dir(tmp_path / "bin_unet")
    booby_trap(unet_dir / "diffusion_pytorch_model.bin", tmp_path / "ran")
    config = tiny_config(tmp_path / "out", caption_folder, max_train_steps=1,
                         model={"unet": str(unet_dir), "vae": "tiny", "text_encoder": "tiny"})
    with pytest.raises(ConfigError, match="holds only pickled weights .*safetensors only"):
        train(config)
    assert not (tmp_path / "ran").exists()


def test_a_pipeline_with_pickled_weights_is_refused_not_unpickled(tmp_path, trained_run):
    pipeline = shutil.copytree(trained_run / "pipeline", tmp_path / "pipeline")
    (pipeline / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    booby_trap(pipeline / "unet" / "diffusion_pytorch_model.bin", tmp_path / "ran")
    with pytest.raises(ConfigError, match="could not load model .*Weights are read as safetensors only"):
        load_pipeline(pipeline, device="cpu")
    assert not (tmp_path / "ran").exists()


def test_yaml_python_tags_are_refused_not_run(tmp_path, caption_folder, capsys):
    marker = tmp_path / "ran"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "out", caption_folder))
                    + f'seed: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match="run.yaml line .*python/object/apply:os.system.*tags that build Python "
                                          "objects are refused"):
        load_config(path)
    assert train_main(["--config", str(path)]) == 2
    assert_one_error_line(capsys.readouterr().err, f"config file {path} line")
    with pytest.raises(ConfigError, match="--set"):
        load_config(None, [f'seed=!!python/object/apply:os.system ["touch {marker}"]'])
    assert not marker.exists()


NO_WEIGHTS = {"CLIPTokenizer", "DDPMScheduler"}  # classes whose from_pretrained reads no weights


def test_the_package_loads_weights_with_use_safetensors_and_never_trusts_remote_code():
    """A source check, so that a new loading call cannot quietly drop the guard."""
    from ldm_pipeline import config

    assert issubclass(config._Loader, yaml.SafeLoader)  # the one yaml.load call is a safe one
    checked = 0
    for path in sorted(Path(ldm_pipeline.__file__).parent.glob("*.py")):
        source = path.read_text()
        assert not re.search(r"torch\.load\(|import pickle|pickle\.loads?\(|yaml\.(unsafe_|full_)?load\("
                             r"(?!text, Loader=_Loader\))",
                             source), path.name
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.Call):
                continue
            keywords = {k.arg: k.value for k in node.keywords}
            assert "trust_remote_code" not in keywords, f"{path.name}:{node.lineno}"
            func, args = node.func, node.args
            # Every from_pretrained call loads weights unless it names a class without any (a call through a
            # variable class, e.g. `cls.from_pretrained`, counts as loading); a pass-through of **kwargs is the
            # wrapper `_from_pretrained`, whose callers are checked.
            target = func.value if isinstance(func, ast.Attribute) else (args[0] if args else None)
            loads = ((isinstance(func, ast.Attribute) and func.attr == "from_pretrained")
                     or (isinstance(func, ast.Name) and func.id == "_from_pretrained")) \
                and not (isinstance(target, ast.Name) and target.id in NO_WEIGHTS) \
                and not (len(node.keywords) == 1 and node.keywords[0].arg is None)
            if loads:
                flag = keywords.get("use_safetensors")
                assert isinstance(flag, ast.Constant) and flag.value is True, f"{path.name}:{node.lineno}"
                checked += 1
    assert checked >= 6  # text encoder, VAE, UNet, pipeline, and train.py's reloads of the trained VAE
