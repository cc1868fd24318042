"""Launcher configs in train_configs/accelerate/: each one is read by Accelerate's own loader, and the
CPU one runs our training with two processes."""

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DistributedType
from conftest import tiny_config_dict
from diffusers import StableDiffusionPipeline
from test_launch import ROOT, accelerate_launch

from ldm_pipeline.models import UNET_PRESETS

CONFIGS = ROOT / "train_configs" / "accelerate"
EXPECTED = {  # file: (distributed_type, num_processes, num_machines)
    "single_gpu.yaml": (DistributedType.NO, 1, 1),
    "multi_gpu.yaml": (DistributedType.MULTI_GPU, 8, 1),
    "multi_node.yaml": (DistributedType.MULTI_GPU, 16, 2),
    "fsdp.yaml": (DistributedType.FSDP, 8, 1),
    "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, 8, 1),
    "cpu_2proc.yaml": (DistributedType.MULTI_GPU, 2, 1),  # + ACCELERATE_USE_CPU=1: see the file
}
# Nested sections reach `accelerate launch` as flags (fsdp_config.x -> --fsdp_x), which the loader
# does not check; a misspelt key there would be silently ignored.
SECTION_PREFIX = {"fsdp_config": "fsdp_", "deepspeed_config": "", "dynamo_config": "dynamo_"}


def test_every_launcher_config_is_covered():
    assert sorted(p.name for p in CONFIGS.iterdir()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launcher_config_loads_with_accelerate(name):
    path = CONFIGS / name
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    assert (config.distributed_type, config.num_processes, config.num_machines) == EXPECTED[name]
    assert config.machine_rank == 0
    flags = {action.dest for action in launch_command_parser()._actions}
    for section, prefix in SECTION_PREFIX.items():
        for key in getattr(config, section):
            flag = key if key.startswith(prefix) else prefix + key
            assert flag in flags, f"{name}: {section}.{key} is not an accelerate launch option"
    assert path.read_text().startswith("#"), f"{name}: say what the config is for and how to launch it"


def test_fsdp_wraps_blocks_the_unet_has():
    from diffusers import UNet2DConditionModel

    config = load_config_from_file(str(CONFIGS / "fsdp.yaml"))
    unet = UNet2DConditionModel(**UNET_PRESETS["tiny"], sample_size=4, cross_attention_dim=32)
    classes = {type(module).__name__ for module in unet.modules()}
    wrapped = config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")
    assert set(wrapped) <= classes


def test_two_cpu_processes_train_through_the_cpu_config(tmp_path, caption_folder):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tmp_path / "out", caption_folder, max_train_steps=2)))
    result = accelerate_launch("train.py", "--config", str(config), processes=2,
                               config_file=CONFIGS / "cpu_2proc.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "effective batch size: 8 = 4 per process x 2 processes x 1 accumulation" in result.stdout
    assert StableDiffusionPipeline.from_pretrained(tmp_path / "out" / "pipeline").unet.config.sample_size == 4
