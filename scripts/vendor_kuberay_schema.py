"""Vendor the part of KubeRay's v1 CRD schemas that cluster/kuberay/ is validated against
(tests/unit/cluster/test_cluster_kuberay.py): the openAPIV3Schema of RayCluster and RayJob v1, without
descriptions and status, the pod template and the RayCluster spec written once as $defs.

    python scripts/vendor_kuberay_schema.py v1.7.0 ray.io_rayclusters.yaml ray.io_rayjobs.yaml

The two files are ray-operator/config/crd/bases/ of github.com/ray-project/kuberay at that tag
(Apache License 2.0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "kuberay_v1_schema.json"


def _v1(path: str) -> dict:
    crd = yaml.safe_load(Path(path).read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k != "description"}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def main(tag: str, clusters: str, jobs: str) -> None:
    cluster, job = _strip(_v1(clusters)), _strip(_v1(jobs))
    for s in (cluster, job):
        s["properties"].pop("status", None)
    spec = cluster["properties"]["spec"]
    pod = spec["properties"]["headGroupSpec"]["properties"]["template"]
    assert spec["properties"]["workerGroupSpecs"]["items"]["properties"]["template"] == pod
    assert job["properties"]["spec"]["properties"]["submitterPodTemplate"] == pod
    assert job["properties"]["spec"]["properties"]["rayClusterSpec"] == spec
    ref = {"$ref": "#/$defs/PodTemplateSpec"}
    spec["properties"]["headGroupSpec"]["properties"]["template"] = ref
    spec["properties"]["workerGroupSpecs"]["items"]["properties"]["template"] = ref
    job["properties"]["spec"]["properties"]["submitterPodTemplate"] = ref
    job["properties"]["spec"]["properties"]["rayClusterSpec"] = {"$ref": "#/$defs/RayClusterSpec"}
    cluster["properties"]["spec"] = {"$ref": "#/$defs/RayClusterSpec"}
    out = {
        "source": f"https://github.com/ray-project/kuberay/tree/{tag}/ray-operator/config/crd/bases "
                  f"(Apache License 2.0): v1 openAPIV3Schema of RayCluster and RayJob, descriptions and status removed",
        "kinds": {"RayCluster": cluster, "RayJob": job},
        "$defs": {"PodTemplateSpec": pod, "RayClusterSpec": spec},
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, separators=(",", ":"), sort_keys=True) + "\n")
    print(f"{OUT}: {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main(*sys.argv[1:])
