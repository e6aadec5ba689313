"""`--scheduler k8s`: a Kubeflow PyTorchJob (one pod per node) plus a ConfigMap with the recipe.

Each pod runs torchrun, which takes its node count, node rank and rendezvous from the ``PET_*``
variables the training operator sets when ``nprocPerNode`` is given. ``run_dir`` lives on a
PersistentVolumeClaim mounted in every pod (checkpoints, MLflow, exports outlive the pods).
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import PurePosixPath
from typing import Any

import yaml

from flora_train.launch.job import Job, LaunchFailed

RECIPE_DIR = "/etc/flora"
RUNS_MOUNT = "/work/runs"


def _k8s_name(name: str) -> str:
    """A DNS-1123 label: lower case alphanumerics and '-', at most 63 characters."""
    clean = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    if not clean:
        raise LaunchFailed(f"launch.job_name {name!r} has no character Kubernetes allows in a name")
    return clean


def _container(job: Job) -> dict[str, Any]:
    la = job.cfg.launch
    limits: dict[str, Any] = {"cpu": str(la.cpus_per_proc * la.procs_per_node)}
    if la.memory:
        limits["memory"] = str(la.memory)
    if la.gpus_per_node:
        limits["nvidia.com/gpu"] = str(int(la.gpus_per_node))  # quantities are strings in the API
    return {
        "name": "pytorch",  # the training operator looks for this container name
        "image": str(la.image),
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "flora_train.launch.torchrun", "-m", "flora_train.cli", "run", f"{RECIPE_DIR}/recipe.yaml"],
        "env": [{"name": str(k), "value": str(v)} for k, v in la.env.items()],
        "resources": {"limits": limits, "requests": dict(limits)},
        "volumeMounts": [{"name": "recipe", "mountPath": RECIPE_DIR, "readOnly": True},
                         {"name": "runs", "mountPath": RUNS_MOUNT}],
    }


def manifests(job: Job) -> list[dict[str, Any]]:
    """The ConfigMap holding the resolved recipe, then the PyTorchJob."""
    from flora_train.config import recipe_to_yaml

    la = job.cfg.launch
    if not la.volume_claim:
        raise LaunchFailed("launch.volume_claim: --scheduler k8s needs a PersistentVolumeClaim for run_dir "
                           "(checkpoints, MLflow, exports must outlive the pods)")
    name = _k8s_name(job.name)
    cfg = job.cfg.copy()
    cfg.run_dir = str(PurePosixPath(RUNS_MOUNT) / PurePosixPath(job.cfg.run_dir).name)
    pod = {
        "metadata": {"labels": {"app.kubernetes.io/name": "flora-train", "flora-train/job": name}},
        "spec": {
            "containers": [_container(job)],
            "volumes": [{"name": "recipe", "configMap": {"name": f"{name}-recipe"}},
                        {"name": "runs", "persistentVolumeClaim": {"claimName": str(la.volume_claim)}}],
        },
    }
    # ExitCode: the operator restarts a pod that exits 128 or above (an eviction's SIGTERM, or
    # flora-train's 143 after a preemption checkpoint) and fails the job on 1-127 (bad input).
    replicas = {"Master": {"replicas": 1, "restartPolicy": "ExitCode", "template": pod}}
    if la.nodes > 1:
        # a copy: one dict twice would be written as a YAML anchor and alias, which kustomize 3.9-4.3 refuses
        replicas["Worker"] = {"replicas": int(la.nodes) - 1, "restartPolicy": "ExitCode",
                              "template": copy.deepcopy(pod)}
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": f"{name}-recipe", "namespace": str(la.namespace)},
                  "data": {"recipe.yaml": recipe_to_yaml(cfg)}}
    pytorch_job = {
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": str(la.namespace)},
        "spec": {"nprocPerNode": str(la.procs_per_node), "runPolicy": {"backoffLimit": int(la.max_restarts)}, "pytorchReplicaSpecs": replicas},
    }
    return [config_map, pytorch_job]


def render(job: Job) -> str:
    return yaml.safe_dump_all(manifests(job), sort_keys=False)


def submit(job: Job, dry_run: bool = False) -> int:
    text = render(job)
    path = job.recipe_path.with_name("pytorchjob.yaml")
    if dry_run:
        print(f"would write {path} and run: kubectl apply -f {path}\n{text}", end="")
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise LaunchFailed(f"kubectl not found on PATH; the manifest is written to {path}: "
                           f"apply it with `kubectl apply -f {path}` where kubectl can reach the cluster")
    proc = subprocess.run([kubectl, "apply", "-f", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LaunchFailed(f"kubectl apply -f {path} failed ({proc.returncode}): {proc.stderr.strip()}")
    print(proc.stdout.strip())
    return 0
