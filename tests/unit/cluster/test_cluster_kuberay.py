"""cluster/kuberay/: every RayCluster and RayJob validates against KubeRay's v1 CRD schema
(tests/data/kuberay_v1_schema.json, vendored by scripts/vendor_kuberay_schema.py), strictly: an
unknown field fails, as with `kubectl apply --validate=strict`. The pieces fit together (the state
volume, Redis, the secrets, the cluster a RayJob selects) and the RayJob's command composes."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from orchestrator.config.compose import compose_root, resolve_jobs
from tests.unit.config.test_config import _isolated  # noqa: F401  (autouse: the real conf/, a scratch cwd)

REPO = Path(__file__).resolve().parents[3]
KUBERAY = REPO / "cluster" / "kuberay"
SCHEMA = json.loads((REPO / "tests" / "data" / "kuberay_v1_schema.json").read_text())
SECRET_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY", "REDIS_PASSWORD"}


def _strict(node):
    """The schema with `additionalProperties: false` on every object that lists its properties and
    does not keep unknown fields: the API server drops (or, strictly, refuses) such a field."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


def _validator(kind: str) -> jsonschema.Draft202012Validator:
    root = kind if kind in SCHEMA["kinds"] else None
    schema = {**(SCHEMA["kinds"][root] if root else {"$ref": f"#/$defs/{kind}"}), "$defs": SCHEMA["$defs"]}
    return jsonschema.Draft202012Validator(_strict(schema))


def _errors(kind: str, doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator(kind).iter_errors(doc)]


def _docs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(KUBERAY.rglob("*.yaml")):
        out += [(str(path.relative_to(KUBERAY)), d) for d in yaml.safe_load_all(path.read_text()) if d]
    return out


DOCS = _docs()


def _one(kind: str) -> dict:
    found = [d for _, d in DOCS if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}s"
    return found[0]


@pytest.mark.parametrize("name,doc", [(n, d) for n, d in DOCS if d["apiVersion"] == "ray.io/v1"],
                         ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_kuberay_manifests_validate_against_the_v1_crd_schema(name, doc):
    assert not _errors(doc["kind"], doc), _errors(doc["kind"], doc)


def test_the_pod_templates_of_other_kinds_validate_too():
    for name, doc in DOCS:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            assert not _errors("PodTemplateSpec", doc["spec"]["template"]), name


def test_the_schema_check_is_strict():
    """A misspelt field, a wrong type, a missing head: each is refused, so the test above can fail."""
    cluster = yaml.safe_load(yaml.safe_dump(_one("RayCluster")))
    cluster["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    assert any("maxReplica" in e for e in _errors("RayCluster", cluster))
    cluster = yaml.safe_load(yaml.safe_dump(_one("RayCluster")))
    cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"] = {"limit": {}}
    assert _errors("RayCluster", cluster)
    cluster["spec"].pop("headGroupSpec")
    assert any("headGroupSpec" in e for e in _errors("RayCluster", cluster))


def _env(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def test_cpu_head_autoscaling_gpu_workers_and_state_on_a_volume():
    spec = _one("RayCluster")["spec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in json.dumps(head)
    (gpu,) = spec["workerGroupSpecs"]
    assert spec["enableInTreeAutoscaling"] is True and gpu["minReplicas"] == 0 < gpu["maxReplicas"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    # ORCH_STATE_DIR is a mount of a claim this folder defines
    pod = head["template"]["spec"]
    container = pod["containers"][0]
    state = _env(container)["ORCH_STATE_DIR"]["value"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == state)
    claim = next(v for v in pod["volumes"] if v["name"] == mount["name"])["persistentVolumeClaim"]["claimName"]
    assert claim in {d["metadata"]["name"] for _, d in DOCS if d["kind"] == "PersistentVolumeClaim"}
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"] != 0  # the non-root user writes


def test_gcs_fault_tolerance_uses_the_redis_of_this_folder():
    ft = _one("RayCluster")["spec"]["gcsFaultToleranceOptions"]
    host, port = ft["redisAddress"].rsplit(":", 1)
    service = next(d for _, d in DOCS if d["kind"] == "Service" and d["metadata"]["name"] == host)
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"]["name"] == "orch-redis"


def test_secrets_come_only_from_kubernetes_secrets():
    assert not [n for n, d in DOCS if d["kind"] == "Secret"], "a Secret with its data in the repository"
    containers = []
    for _, doc in DOCS:
        text = json.dumps(doc)
        for needle in ("AKIA", "sk-", "value\": \"wandb"):
            assert needle not in text
        for pod in _pod_specs(doc):
            containers += pod["containers"]
    seen = set()
    for c in containers:
        for name, e in _env(c).items():
            if name in SECRET_ENV:
                seen.add(name)
                assert "value" not in e and "secretKeyRef" in e["valueFrom"], (c["name"], name)
        assert "envFrom" not in c  # every secret named, key by key
    assert seen == SECRET_ENV


def _pod_specs(doc: dict):
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        yield spec["headGroupSpec"]["template"]["spec"]
        yield from (g["template"]["spec"] for g in spec["workerGroupSpecs"])
    elif doc["kind"] == "RayJob":
        yield spec["submitterPodTemplate"]["spec"]
    elif "template" in spec:
        yield spec["template"]["spec"]


def test_the_rayjob_runs_a_pipeline_on_the_cluster_and_its_command_composes():
    job = _one("RayJob")["spec"]
    assert job["clusterSelector"]["ray.io/cluster"] == _one("RayCluster")["metadata"]["name"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["orch", "run"]
    overrides = [a for a in argv[2:] if "=" in a and not a.startswith("-")]
    root = compose_root(overrides)
    jobs = resolve_jobs(root)
    assert {j.kind for j in jobs} == {"pretrain", "finetune"}
    assert (root.cluster.backend, root.deepspeed.precision, root.storage.backend) == ("nccl", "bf16", "s3")
    # the GPU group starts at 0 pods: only an autoscaling cluster admits a job before its nodes exist
    assert root.cluster.autoscaling is True
    images = {c["image"] for _, d in DOCS if d["apiVersion"] == "ray.io/v1" for p in _pod_specs(d)
              for c in p["containers"]}
    assert len(images) == 1  # one image everywhere: the same orch, Python and Ray on every pod


def _fields(node) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in _fields(v)}
    if isinstance(node, list):
        return {k for v in node for k in _fields(v)}
    return set()


def test_the_readmes_ask_for_a_kuberay_operator_that_knows_every_field():
    """gcsFaultToleranceOptions came in KubeRay v1.3.0 (an older operator rejects or drops it): the
    operator version the READMEs name is at least the newest field's (tests/data/kuberay_field_versions.json)."""
    table = json.loads((REPO / "tests" / "data" / "kuberay_field_versions.json").read_text())
    needed = (1, 0, 0)
    for path in sorted(KUBERAY.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") in ("RayCluster", "RayJob"):
                for field in _fields(doc.get("spec", {})) & set(table[doc["kind"]]):
                    needed = max(needed, tuple(int(x) for x in table[doc["kind"]][field].split(".")))
    assert needed >= (1, 3, 0)  # the manifests use gcsFaultToleranceOptions
    for readme in (KUBERAY / "README.md", REPO / "cluster" / "README.md"):
        said = re.findall(r"KubeRay operator,? v(\d+)\.(\d+)(?:\.(\d+))? or later", readme.read_text())
        assert said, f"{readme.relative_to(REPO)} does not say which KubeRay operator it needs"
        for v in said:
            assert tuple(int(x or 0) for x in v) >= needed, (readme.name, v, needed)
