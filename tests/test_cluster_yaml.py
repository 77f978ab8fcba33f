"""cluster.yaml / cluster-onprem.yaml pass Ray's own launcher validation and keep the project's layout."""

import copy
import re
from pathlib import Path

import pytest
import yaml

from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
# AWS GPU instance families that come with NVMe instance store.
NVME_GPU_TYPES = re.compile(r"^(g5|g6|g6e|p4d|p4de|p5|p5e|g4dn)\.")


def _load(name):
    return yaml.safe_load((ROOT / name).read_text())


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-onprem.yaml"])
def test_ray_validates_config(name):
    config = _load(name)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)  # raises jsonschema.ValidationError on any unknown/missing field
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_validation_catches_a_broken_config():
    # the check above can fail: an unknown top-level field is refused by Ray's schema
    config = _load("cluster.yaml")
    config["not_a_ray_field"] = 1
    with pytest.raises(Exception):
        validate_config(prepare_config(config))


def test_aws_workers_have_nvme_instance_store():
    config = _load("cluster.yaml")
    assert config["provider"]["type"] == "aws"
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert workers
    for name, node in workers.items():
        assert NVME_GPU_TYPES.match(node["node_config"]["InstanceType"]), name


def test_onprem_runs_the_same_node_commands_as_the_tested_aws_config():
    # tests/test_cluster_launch.py runs cluster.yaml's commands; the on-prem file must not drift from them
    aws, onprem = _load("cluster.yaml"), _load("cluster-onprem.yaml")
    for key in ("docker", "file_mounts", "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert onprem[key] == aws[key], key


def test_onprem_is_local_provider():
    config = _load("cluster-onprem.yaml")
    assert config["provider"]["type"] == "local"
    assert config["provider"]["head_ip"] and config["provider"]["worker_ips"]
