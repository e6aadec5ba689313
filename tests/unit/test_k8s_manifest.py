"""The Kubernetes manifest `flora-train launch --scheduler k8s` writes, checked against the
PyTorchJob schema as the Kubeflow training SDK's generated models (kubeflow-training 1.9, built
from the operator's CRD) and the Kubernetes client's models describe it: every key must exist,
every value must have its type, and every model must construct (required fields, enums)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from flora_train.config import load_recipe
from flora_train.launch.job import LaunchFailed, make_job
from flora_train.launch.k8s import manifests, render

from kubeflow.training import models as kf  # test dependency (requirements/test.txt)
from kubernetes.client import models as k8s

from tests.e2e.helpers import REPO


def build(value: Any, type_name: str, path: str) -> Any:
    """Walks ``value`` as ``type_name`` and returns the constructed model, failing at ``path``."""
    if m := re.fullmatch(r"list\[(.+)\]", type_name):
        assert isinstance(value, list), f"{path}: expected a list"
        return [build(v, m.group(1), f"{path}[{i}]") for i, v in enumerate(value)]
    if m := re.fullmatch(r"dict\(str, (.+)\)", type_name):
        assert isinstance(value, dict), f"{path}: expected a mapping"
        return {k: build(v, m.group(1), f"{path}.{k}") for k, v in value.items()}
    primitive = {"str": str, "int": int, "bool": bool, "float": (int, float)}
    if type_name in primitive:
        assert isinstance(value, primitive[type_name]) and not (type_name == "int" and isinstance(value, bool)), \
            f"{path}: {value!r} is not {type_name}"
        return value
    if type_name == "object":
        return value
    cls = getattr(kf, type_name, None) or getattr(k8s, type_name)
    assert isinstance(value, dict), f"{path}: expected a {type_name} mapping"
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    unknown = sorted(set(value) - set(by_json))
    assert not unknown, f"{path}: {type_name} has no field(s) {unknown}"
    kwargs = {by_json[k]: build(v, cls.openapi_types[by_json[k]], f"{path}.{k}") for k, v in value.items()}
    return cls(**kwargs)  # the generated setters reject missing required fields and bad enum values


def _job(tmp_path, *overrides):
    return make_job(load_recipe(REPO / "recipes/quickstart.yaml", [
        f"run_dir={tmp_path / 'my run'}", "launch.scheduler=k8s", "launch.volume_claim=flora-runs",
        "launch.env.NCCL_DEBUG=INFO", *overrides]))


@pytest.mark.parametrize("nodes", [1, 3])
def test_pytorchjob_matches_the_schema(tmp_path, nodes):
    config_map, job = manifests(_job(tmp_path, f"launch.nodes={nodes}", "launch.procs_per_node=8",
                                      "launch.gpus_per_node=8", "launch.memory=200Gi", "launch.image=reg.io/flora:1"))
    built = build(job, "KubeflowOrgV1PyTorchJob", "PyTorchJob")
    specs = built.spec.pytorch_replica_specs
    assert specs["Master"].replicas == 1 and (specs["Worker"].replicas == nodes - 1 if nodes > 1 else "Worker" not in specs)
    container = specs["Master"].template.spec.containers[0]
    assert container.name == "pytorch" and container.image == "reg.io/flora:1"
    assert container.resources.limits["nvidia.com/gpu"] == "8" and built.spec.nproc_per_node == "8"
    assert {"name": "NCCL_DEBUG", "value": "INFO"} in job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
    build(config_map, "V1ConfigMap", "ConfigMap")
    recipe = yaml.safe_load(config_map["data"]["recipe.yaml"])
    # the pods read and write run_dir on the claim, under the run's own name
    assert recipe["run_dir"] == "/work/runs/my run" and recipe["launch"]["volume_claim"] == "flora-runs"
    assert built.metadata.name == "flora-my-run"


def test_schema_check_catches_a_wrong_manifest(tmp_path):
    _, job = manifests(_job(tmp_path))
    job["spec"]["pytorchReplicaSpecs"]["Master"]["replica"] = 1
    with pytest.raises(AssertionError, match="has no field"):
        build(job, "KubeflowOrgV1PyTorchJob", "PyTorchJob")


def test_k8s_needs_a_volume_for_run_dir(tmp_path):
    with pytest.raises(LaunchFailed, match="launch.volume_claim"):
        manifests(_job(tmp_path, "launch.volume_claim=null"))


def test_the_written_manifest_has_no_yaml_aliases(tmp_path):
    """Master and Worker pods are the same template: written once with an anchor and an alias, kustomize
    3.9-4.3 refuses the file and an edit of one pod's block by hand changes the other's too."""
    text = render(_job(tmp_path, "launch.nodes=2"))
    events = [type(e).__name__ for e in yaml.parse(text)]
    assert "AliasEvent" not in events
    _, job = yaml.safe_load_all(text)
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["template"] == specs["Worker"]["template"]
