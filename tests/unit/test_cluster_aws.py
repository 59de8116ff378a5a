"""cluster/aws-gpu.yaml, checked by Ray's own cluster launcher code (no AWS call): the schema
(`validate_config(prepare_config(...))`, what `ray up` runs first), the EFA interfaces, and that the
nodes use the Deep Learning AMI's CUDA torch instead of downloading one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
AWS = REPO / "cluster" / "aws-gpu.yaml"
DLAMI_ENV = "/opt/pytorch/bin/"  # the AMI's PyTorch virtual environment


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(AWS.read_text())


def test_ray_validates_the_cluster_definition(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    assert prepared["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 8
    assert prepared["available_node_types"]["head"]["resources"]["CPU"] == 0  # no training on the head


def test_ray_accepts_the_efa_interfaces(config):
    from ray.autoscaler._private.aws.config import _configure_subnets_and_groups_from_network_interfaces

    gpu = config["available_node_types"]["gpu_worker"]["node_config"]
    assert {ni["InterfaceType"] for ni in gpu["NetworkInterfaces"]} == {"efa"}
    out = _configure_subnets_and_groups_from_network_interfaces(gpu)
    assert out["SubnetIds"] and out["SecurityGroupIds"]


def test_nodes_use_the_amis_cuda_torch_and_download_none(config):
    commands = config["setup_commands"] + config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    installs = [c for c in commands if "pip install" in c]
    assert installs, "orch is not installed on the nodes"
    for c in installs:
        # into the AMI's environment, its torch pinned (pip may not replace it), orch from the wheel
        assert f"{DLAMI_ENV}python -m pip install" in c and "-c ~/torch-constraint.txt" in c and "orch-dist" in c, c
        assert not re.search(r"\btorch\b[=<>]", c.replace("torch-constraint", "")), c
        assert " -e " not in c and "setup.sh" not in c, c
    assert "'torch==' + torch.__version__" in config["setup_commands"][0]  # the constraint is the AMI's torch
    assert "/home/ubuntu/orch-dist" in config["file_mounts"]
    for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert re.search(r"(^|; )" + re.escape(DLAMI_ENV) + r"ray (start|stop)", c), c


def test_gpu_workers_get_nccl_over_efa(config):
    start = " ".join(config["worker_start_ray_commands"])
    for setting in ("FI_PROVIDER=efa", "FI_EFA_USE_DEVICE_RDMA=1", "NCCL_SOCKET_IFNAME=", "/opt/amazon/ofi-nccl/lib"):
        assert setting in start, setting
    assert start.index("export FI_PROVIDER") < start.index("ray start")  # Ray's processes inherit it


def test_no_credentials_in_the_definition():
    text = AWS.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert not re.search(r"(AWS_SECRET_ACCESS_KEY|WANDB_API_KEY)=[\"']?[A-Za-z0-9]", text)
