"""cluster.yaml is a config `ray up` accepts: Ray's own schema and checks (offline, nothing reaches AWS), a head
that runs no work, a GPU worker type whose resources name its GPU, images of the pinned Ray version."""
import copy
import socket

import pytest
import yaml

from tests.cluster_helpers import ROOT, pinned_ray_version


@pytest.fixture
def cluster_config():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"cluster config validation tried to connect: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_cluster_yaml_passes_rays_validation(cluster_config, offline):
    from ray.autoscaler._private.util import prepare_config, validate_config
    validate_config(prepare_config(copy.deepcopy(cluster_config)))   # what `ray up` runs before bootstrapping


def test_validation_refuses_a_worker_type_without_resources(cluster_config, offline):
    """The check above can fail: the error `ray up` gave before every node type had resources."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config
    broken = copy.deepcopy(cluster_config)
    del broken["available_node_types"]["gpu_worker"]["resources"]
    with pytest.raises(jsonschema.ValidationError, match="'resources' is a required property"):
        validate_config(prepare_config(broken))


def test_node_types_head_without_work_and_a_gpu_worker(cluster_config):
    types = cluster_config["available_node_types"]
    assert all("resources" in t for t in types.values())
    assert types[cluster_config["head_node_type"]]["resources"].get("CPU") == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(t["resources"].get("CPU", 0) >= 1 for t in gpu_types)
    assert all(t.get("min_workers", 0) == 0 for t in gpu_types), "GPU workers should scale from zero"
    assert all("gpu" in t.get("docker", {}).get("worker_image", "") for t in gpu_types), "GPU types need a GPU image"
    workers = [t for name, t in types.items() if name != cluster_config["head_node_type"]]
    assert sum(t["max_workers"] for t in workers) >= cluster_config["max_workers"] > 0


def test_images_carry_the_pinned_ray_version(cluster_config):
    version = pinned_ray_version()
    import ray
    assert ray.__version__ == version, "the venv's Ray is not the version pyproject.toml pins"
    docker = cluster_config["docker"]
    images = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    images += [t["docker"]["worker_image"] for t in cluster_config["available_node_types"].values()
               if "worker_image" in t.get("docker", {})]
    assert images
    for image in images:
        repo, _, tag = image.rpartition(":")
        assert repo == "rayproject/ray" and (tag == version or tag.startswith(version + "-")), image
