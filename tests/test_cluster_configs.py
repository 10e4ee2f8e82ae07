"""Every config under cluster/ parses, carries what Ray, its autoscaler and KubeRay require, keeps
authentication on and holds no secret values.

- `cluster/aws/cluster.yaml` goes through Ray's own `prepare_config` + `validate_config` (the
  autoscaler's JSON schema, as `ray up` does) and its EC2 node configs through botocore's model of
  RunInstances.
- `cluster/runtime_env.yaml` is built into Ray's `RuntimeEnv` and packaged by Ray's own packager.
- No KubeRay CRD schema ships with Ray, so KUBE_SHAPES below restates the fields of the ray.io/v1
  types (KubeRay's Go API types and CRD reference, v1.6/v1.7) and of the Kubernetes objects used,
  and the checker rejects unknown, missing or mistyped fields.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT

import ray

CLUSTER = REPO_ROOT / "cluster"
RAY_VERSION = ray.__version__
ALL_FILES = sorted(path for path in CLUSTER.rglob("*") if path.is_file() and "__pycache__" not in path.parts)
YAML_FILES = [path for path in ALL_FILES if path.suffix in (".yaml", ".yml")]
KUBE_FILES = [path for path in YAML_FILES if path.parent.name == "kuberay"]
AWS_CONFIG = CLUSTER / "aws" / "cluster.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
DOCKERFILE = CLUSTER / "kuberay" / "Dockerfile"
UPLOAD_LIMIT = 100 * 1024**2  # the Jobs API's limit on a working_dir upload


def documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document is not None]


def kube_objects(kind: str | None = None) -> list[tuple[Path, dict]]:
    return [
        (path, document)
        for path in KUBE_FILES
        for document in documents(path)
        if kind is None or document.get("kind") == kind
    ]


def rel(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


# --------------------------------------------------------------------------------------------------
# Every YAML file: parses, and each document is one of the kinds checked below.


def document_kind(path: Path, document: dict) -> str:
    if path == RUNTIME_ENV:
        return "runtime_env"
    if path == AWS_CONFIG:
        return "ray-autoscaler"
    return f"{document.get('apiVersion')}/{document.get('kind')}"


CHECKED_KINDS = {
    "runtime_env", "ray-autoscaler", "ray.io/v1/RayCluster", "ray.io/v1/RayJob", "batch/v1/CronJob",
    "networking.k8s.io/v1/NetworkPolicy",
}  # fmt: skip


def test_cluster_holds_the_configs_the_operations_guide_names():
    names = {rel(path) for path in ALL_FILES}
    assert {
        "cluster/local/start.sh", "cluster/local/stop.sh", "cluster/make_token.sh", "cluster/runtime_env.yaml",
        "cluster/aws/cluster.yaml", "cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob-train.yaml",
        "cluster/kuberay/cronjob-nightly-predict.yaml", "cluster/kuberay/Dockerfile",
    } <= names  # fmt: skip


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_every_yaml_parses_into_documents_of_a_checked_kind(path):
    found = documents(path)
    assert found, f"{rel(path)} is empty"
    for document in found:
        assert isinstance(document, dict), f"{rel(path)}: a document is not a mapping"
        assert document_kind(path, document) in CHECKED_KINDS, f"{rel(path)}: no check for {document_kind(path, document)}"


# --------------------------------------------------------------------------------------------------
# cluster/aws/cluster.yaml, as `ray up` checks it, and more.


def aws_config() -> dict:
    return yaml.safe_load(AWS_CONFIG.read_text())


def prepared_aws_config() -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(aws_config())
    validate_config(prepared)
    return prepared


def test_aws_cluster_config_passes_rays_own_validation():
    prepared = prepared_aws_config()
    assert prepared["provider"]["type"] == "aws" and prepared["provider"]["region"]
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c.update(max_worker=3),  # a misspelt top-level key
        lambda c: c["available_node_types"]["cpu_worker"].pop("resources"),
        lambda c: c["available_node_types"]["cpu_worker"].update(min_worker=1),
        lambda c: c.update(max_workers=0),  # smaller than the sum of min_workers
    ],
    ids=["unknown-key", "no-resources", "misspelt-node-field", "max-below-min"],
)
def test_rays_validation_rejects_a_broken_variant_of_the_aws_config(breakage):
    """The check above has teeth: the same validation refuses these small breakages."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = aws_config()
    breakage(config)
    with pytest.raises(Exception):
        validate_config(prepare_config(config))


def test_aws_node_configs_are_valid_ec2_run_instances_parameters():
    """Ray passes node_config to EC2 RunInstances: check it against botocore's model of that call."""
    import botocore.session
    from botocore.validate import ParamValidator

    operation = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances")
    instance_types = set(operation.input_shape.members["InstanceType"].enum)
    for name, node_type in aws_config()["available_node_types"].items():
        node_config = node_type["node_config"]
        report = ParamValidator().validate({**node_config, "MinCount": 1, "MaxCount": 1}, operation.input_shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"
        assert node_config["InstanceType"] in instance_types, name
        # S3 through an instance role, and its credentials only through IMDSv2.
        assert set(node_config["IamInstanceProfile"]) & {"Name", "Arn"}, name
        assert node_config["MetadataOptions"]["HttpTokens"] == "required", name


def ray_start(commands: list[str]) -> str:
    starts = [command for command in commands if "ray start" in command]
    assert len(starts) == 1, commands
    return starts[0]


def test_aws_cluster_turns_token_auth_on_and_keeps_the_jobs_api_off_the_network():
    prepared = prepared_aws_config()
    head = ray_start(prepared["head_start_ray_commands"])
    worker = ray_start(prepared["worker_start_ray_commands"])
    for command in (head, worker):
        assert re.search(r"\bRAY_AUTH_MODE=token\s", command), command
        assert "RAY_AUTH_TOKEN=" not in command  # the token comes from a file, never inline
    assert "--head" in head and "--address=$RAY_HEAD_IP:6379" in worker
    assert "--dashboard-host=127.0.0.1" in head
    every_command = json.dumps({key: value for key, value in prepared.items() if key.endswith("_commands")})
    assert "0.0.0.0" not in every_command  # e.g. Ray's default --dashboard-host=0.0.0.0 did not slip in
    # The token: a local file of this cluster's own (not the local cluster's ~/.ray/auth_token), copied
    # to Ray's default token path on every node and made private there.
    source = prepared["file_mounts"]["~/.ray/auth_token"]
    assert source.startswith("~/.ray/") and source != "~/.ray/auth_token"
    assert any("chmod 600 ~/.ray/auth_token" in command for command in prepared["setup_commands"])
    # Clients on the nodes (ray status, ray job submit) run with token mode too.
    assert any("export RAY_AUTH_MODE=token" in command for command in prepared["setup_commands"])


def test_aws_cluster_keeps_drivers_and_work_off_the_head_node():
    prepared = prepared_aws_config()
    head_type = prepared["available_node_types"][prepared["head_node_type"]]
    assert head_type["resources"] == {"CPU": 0}
    assert "--num-cpus=0" in ray_start(prepared["head_start_ray_commands"])


def test_aws_cluster_has_cpu_workers_and_optional_gpu_workers_on_the_ray_of_this_project():
    config = aws_config()
    workers = {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}
    gpu = {name: t for name, t in workers.items() if re.match(r"(g|p)\d", t["node_config"]["InstanceType"])}
    cpu = {name: t for name, t in workers.items() if name not in gpu}
    assert cpu and all(t["max_workers"] >= max(1, t.get("min_workers", 0)) for t in cpu.values())
    assert gpu and all(t.get("min_workers", 0) == 0 and t["max_workers"] >= 1 for t in gpu.values())
    image_prefix = f"rayproject/ray:{RAY_VERSION}-py311"
    assert config["docker"]["image"] == f"{image_prefix}-cpu"
    for gpu_type in gpu.values():
        assert gpu_type["docker"]["worker_image"] == f"{image_prefix}-gpu"
    assert any("tensorflow[and-cuda]" in command for command in config["setup_commands"])


def test_aws_cluster_installs_this_package_from_a_wheel_of_the_checkout(tmp_path):
    """The mount is dist/ of the checkout; the setup installs the wheel that `pip wheel` makes of it
    (built here from a copy of the package, offline, as the README says)."""
    pytest.importorskip("setuptools", reason="`pip wheel --no-build-isolation` builds with the venv's setuptools")
    config = aws_config()
    [(remote, local)] = [(r, l) for r, l in config["file_mounts"].items() if l == "dist"]
    [install] = [c for c in config["setup_commands"] if c.startswith("pip install") and remote in c]
    pattern = shlex.split(install)[-1]
    assert pattern.startswith(f"{remote}/")

    source = tmp_path / "src"
    shutil.copytree(REPO_ROOT / "imgcls", source / "imgcls", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir",
         str(tmp_path / local), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    wheels = [p.name for p in (tmp_path / local).iterdir()]
    assert [w for w in wheels if fnmatch.fnmatch(w, Path(pattern).name)] == wheels and len(wheels) == 1
    with zipfile.ZipFile(tmp_path / local / wheels[0]) as wheel:
        assert {"imgcls/__init__.py", "imgcls/cli.py", "imgcls/train.py", "imgcls/predict.py"} <= set(wheel.namelist())


# --------------------------------------------------------------------------------------------------
# cluster/runtime_env.yaml


def test_runtime_env_is_a_valid_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    spec = yaml.safe_load(RUNTIME_ENV.read_text())
    assert set(spec) <= RuntimeEnv.known_fields, set(spec) - RuntimeEnv.known_fields
    runtime_env = RuntimeEnv(**spec)  # raises on wrong types (env_vars not str -> str, ...)
    assert runtime_env["working_dir"] == "."
    assert {".venv/", "runs/", "examples/data/"} <= set(runtime_env["excludes"])
    assert runtime_env["env_vars"]["TF_CPP_MIN_LOG_LEVEL"] == "2"
    # Dependencies are installed on every node, not per job.
    assert not set(spec) & {"pip", "conda", "uv", "container", "image_uri"}


def test_runtime_env_uploads_the_code_and_leaves_environments_and_data_behind(tmp_path):
    """Package the checkout the way `ray job submit --runtime-env cluster/runtime_env.yaml` does."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package

    spec = yaml.safe_load(RUNTIME_ENV.read_text())
    package = tmp_path / "working_dir.zip"
    excludes = ray_constants.get_runtime_env_default_excludes() + list(spec["excludes"])
    create_package(str(REPO_ROOT / spec["working_dir"]), package, include_gitignore=True, excludes=excludes)
    with zipfile.ZipFile(package) as archive:
        names = set(archive.namelist())
    assert {"jobs/train.py", "jobs/predict.py", "imgcls/cli.py", "examples/configs/smoke.yaml"} <= names
    for left_out in (".venv/", "runs/", "examples/data/", ".git/"):
        assert not [name for name in names if name.startswith(left_out)], left_out
    assert package.stat().st_size < UPLOAD_LIMIT


# --------------------------------------------------------------------------------------------------
# KubeRay and Kubernetes objects: a field-level checker.

ANY = "any"
STR, INT, BOOL, NUMBER = "str", "int", "bool", "number"
STR_MAP = "map[str]str"
QUANTITY_MAP = "map[str]quantity"


def shape(fields: dict, required: tuple = ()) -> dict:
    return {"fields": fields, "required": required}


def enum(*values: str) -> tuple:
    return ("enum", values)


def list_of(item) -> tuple:
    return ("list", item)


KUBE_SHAPES = {
    # Kubernetes core objects used by the manifests (k8s.io/api, v1.32).
    "ObjectMeta": shape({"name": STR, "generateName": STR, "namespace": STR, "labels": STR_MAP, "annotations": STR_MAP}),
    "TemplateMeta": shape({"name": STR, "labels": STR_MAP, "annotations": STR_MAP}),
    "PodTemplateSpec": shape({"metadata": "TemplateMeta", "spec": "PodSpec"}, ("spec",)),
    "PodSpec": shape(
        {
            "containers": list_of("Container"), "initContainers": list_of("Container"),
            "restartPolicy": enum("Always", "OnFailure", "Never"), "tolerations": list_of("Toleration"),
            "nodeSelector": STR_MAP, "serviceAccountName": STR, "automountServiceAccountToken": BOOL,
            "volumes": list_of(ANY), "affinity": ANY, "securityContext": ANY, "imagePullSecrets": list_of(ANY),
            "terminationGracePeriodSeconds": INT, "activeDeadlineSeconds": INT, "priorityClassName": STR,
            "topologySpreadConstraints": list_of(ANY), "runtimeClassName": STR, "schedulerName": STR,
            "enableServiceLinks": BOOL, "hostNetwork": BOOL, "dnsPolicy": STR,
        },
        ("containers",),
    ),  # fmt: skip
    "Container": shape(
        {
            "name": STR, "image": STR, "command": list_of(STR), "args": list_of(STR), "workingDir": STR,
            "ports": list_of("ContainerPort"), "envFrom": list_of("EnvFromSource"), "env": list_of("EnvVar"),
            "resources": "ResourceRequirements", "volumeMounts": list_of(ANY), "lifecycle": ANY,
            "livenessProbe": ANY, "readinessProbe": ANY, "startupProbe": ANY, "securityContext": ANY,
            "imagePullPolicy": enum("Always", "Never", "IfNotPresent"),
        },
        ("name", "image"),
    ),  # fmt: skip
    "ContainerPort": shape(
        {"containerPort": INT, "name": STR, "protocol": enum("TCP", "UDP", "SCTP"), "hostPort": INT, "hostIP": STR},
        ("containerPort",),
    ),
    "EnvVar": shape({"name": STR, "value": STR, "valueFrom": "EnvVarSource"}, ("name",)),
    "EnvVarSource": shape(
        {"secretKeyRef": "KeySelector", "configMapKeyRef": "KeySelector", "fieldRef": ANY, "resourceFieldRef": ANY}
    ),
    "KeySelector": shape({"name": STR, "key": STR, "optional": BOOL}, ("name", "key")),
    "EnvFromSource": shape({"prefix": STR, "secretRef": "NameRef", "configMapRef": "NameRef"}),
    "NameRef": shape({"name": STR, "optional": BOOL}, ("name",)),
    "ResourceRequirements": shape({"requests": QUANTITY_MAP, "limits": QUANTITY_MAP, "claims": list_of(ANY)}),
    "Toleration": shape(
        {
            "key": STR, "operator": enum("Exists", "Equal"), "value": STR,
            "effect": enum("NoSchedule", "PreferNoSchedule", "NoExecute"), "tolerationSeconds": INT,
        }
    ),  # fmt: skip
    "CronJobSpec": shape(
        {
            "schedule": STR, "timeZone": STR, "startingDeadlineSeconds": INT,
            "concurrencyPolicy": enum("Allow", "Forbid", "Replace"), "suspend": BOOL, "jobTemplate": "JobTemplateSpec",
            "successfulJobsHistoryLimit": INT, "failedJobsHistoryLimit": INT,
        },
        ("schedule", "jobTemplate"),
    ),  # fmt: skip
    "JobTemplateSpec": shape({"metadata": "TemplateMeta", "spec": "JobSpec"}, ("spec",)),
    "JobSpec": shape(
        {
            "template": "PodTemplateSpec", "backoffLimit": INT, "activeDeadlineSeconds": INT,
            "ttlSecondsAfterFinished": INT, "parallelism": INT, "completions": INT, "suspend": BOOL,
        },
        ("template",),
    ),  # fmt: skip
    "NetworkPolicySpec": shape(
        {
            "podSelector": "LabelSelector", "policyTypes": list_of(enum("Ingress", "Egress")),
            "ingress": list_of("NetworkPolicyRule"), "egress": list_of(ANY),
        },
        ("podSelector",),
    ),  # fmt: skip
    "NetworkPolicyRule": shape({"from": list_of("NetworkPolicyPeer"), "ports": list_of("NetworkPolicyPort")}),
    "NetworkPolicyPeer": shape({"podSelector": "LabelSelector", "namespaceSelector": "LabelSelector", "ipBlock": ANY}),
    "NetworkPolicyPort": shape({"protocol": enum("TCP", "UDP", "SCTP"), "port": ANY, "endPort": INT}),
    "LabelSelector": shape({"matchLabels": STR_MAP, "matchExpressions": list_of(ANY)}),
    # KubeRay ray.io/v1 (apis/ray/v1/raycluster_types.go, rayjob_types.go; CRD reference v1.6/v1.7).
    "RayClusterSpec": shape(
        {
            "rayVersion": STR, "authOptions": "AuthOptions", "enableInTreeAutoscaling": BOOL,
            "autoscalerOptions": "AutoscalerOptions", "headGroupSpec": "HeadGroupSpec",
            "workerGroupSpecs": list_of("WorkerGroupSpec"), "headServiceAnnotations": STR_MAP, "suspend": BOOL,
            "managedBy": STR, "gcsFaultToleranceOptions": ANY,
        },
        ("headGroupSpec",),
    ),  # fmt: skip
    "AuthOptions": shape({"mode": enum("disabled", "token"), "secretName": STR, "enableK8sTokenAuth": BOOL}),
    "AutoscalerOptions": shape(
        {
            "resources": "ResourceRequirements", "image": STR, "imagePullPolicy": STR, "securityContext": ANY,
            "idleTimeoutSeconds": INT, "upscalingMode": enum("Default", "Aggressive", "Conservative"),
            "env": list_of("EnvVar"), "envFrom": list_of("EnvFromSource"), "volumeMounts": list_of(ANY),
        }
    ),  # fmt: skip
    "HeadGroupSpec": shape(
        {
            "template": "PodTemplateSpec", "rayStartParams": STR_MAP, "headService": ANY, "enableIngress": BOOL,
            "serviceType": enum("ClusterIP", "NodePort", "LoadBalancer"),
        },
        ("template", "rayStartParams"),
    ),  # fmt: skip
    "WorkerGroupSpec": shape(
        {
            "groupName": STR, "replicas": INT, "minReplicas": INT, "maxReplicas": INT, "idleTimeoutSeconds": INT,
            "rayStartParams": STR_MAP, "template": "PodTemplateSpec", "scaleStrategy": ANY, "numOfHosts": INT,
            "suspend": BOOL,
        },
        ("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"),
    ),  # fmt: skip
    "RayJobSpec": shape(
        {
            "entrypoint": STR, "runtimeEnvYAML": STR, "jobId": STR, "metadata": STR_MAP,
            "submissionMode": enum("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"),
            "entrypointNumCpus": NUMBER, "entrypointNumGpus": NUMBER, "entrypointResources": STR,
            "rayClusterSpec": "RayClusterSpec", "clusterSelector": STR_MAP, "submitterPodTemplate": "PodTemplateSpec",
            "submitterConfig": ANY, "shutdownAfterJobFinishes": BOOL, "ttlSecondsAfterFinished": INT,
            "activeDeadlineSeconds": INT, "backoffLimit": INT, "suspend": BOOL, "managedBy": STR,
            "deletionPolicy": ANY,
        },
    ),  # fmt: skip
}
KIND_SPECS = {
    "ray.io/v1/RayCluster": "RayClusterSpec",
    "ray.io/v1/RayJob": "RayJobSpec",
    "batch/v1/CronJob": "CronJobSpec",
    "networking.k8s.io/v1/NetworkPolicy": "NetworkPolicySpec",
}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")


def check_value(value, kind, where: str) -> list[str]:
    """Problems of `value` against a KUBE_SHAPES type (or a scalar/list/map/enum type)."""
    if kind == ANY:
        return []
    if isinstance(kind, tuple) and kind[0] == "enum":
        return [] if value in kind[1] else [f"{where}: {value!r} is not one of {kind[1]}"]
    if isinstance(kind, tuple) and kind[0] == "list":
        if not isinstance(value, list):
            return [f"{where}: expected a list"]
        return [problem for i, item in enumerate(value) for problem in check_value(item, kind[1], f"{where}[{i}]")]
    scalars = {STR: str, INT: int, BOOL: bool, NUMBER: (int, float)}
    if kind in scalars:
        wrong = not isinstance(value, scalars[kind]) or (kind in (INT, NUMBER) and isinstance(value, bool))
        return [f"{where}: expected {kind}, got {value!r}"] if wrong else []
    if kind in (STR_MAP, QUANTITY_MAP):
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping"]
        problems = [f"{where}.{key}: expected a string, got {item!r}" for key, item in value.items() if not isinstance(item, str)]
        if kind == QUANTITY_MAP:
            problems += [f"{where}.{key}: {item!r} is not a quantity" for key, item in value.items()
                         if isinstance(item, str) and not QUANTITY.match(item)]  # fmt: skip
        return problems
    if not isinstance(value, dict):
        return [f"{where}: expected a {kind} mapping"]
    spec = KUBE_SHAPES[kind]
    problems = [f"{where}: unknown field {key!r} for {kind}" for key in value if key not in spec["fields"]]
    problems += [f"{where}: missing required field {key!r}" for key in spec["required"] if key not in value]
    for key, item in value.items():
        if key in spec["fields"]:
            problems += check_value(item, spec["fields"][key], f"{where}.{key}")
    return problems


def check_kube_object(document: dict) -> list[str]:
    kind = f"{document.get('apiVersion')}/{document.get('kind')}"
    if kind not in KIND_SPECS:
        return [f"no checker for {kind}"]
    problems = [f"unknown top-level field {key!r}" for key in document if key not in {"apiVersion", "kind", "metadata", "spec"}]
    metadata = document.get("metadata") or {}
    problems += check_value(metadata, "ObjectMeta", "metadata")
    name = metadata.get("name") or metadata.get("generateName", "").rstrip("-")
    if not name or not DNS_LABEL.match(name) or len(name) > 52:  # a CronJob's Jobs append 11 characters
        problems.append(f"metadata: bad or missing name {name!r}")
    if "spec" not in document:
        return [*problems, "missing spec"]
    problems += check_value(document["spec"], KIND_SPECS[kind], "spec")
    for where, container in containers_of(document):
        if not DNS_LABEL.match(container.get("name", "")):
            problems.append(f"{where}: container name {container.get('name')!r} is not a DNS label")
        for env in container.get("env", []):
            if ("value" in env) == ("valueFrom" in env):
                problems.append(f"{where}: env {env.get('name')} needs exactly one of value, valueFrom")
    return problems


def pod_templates(document: dict) -> list[tuple[str, dict]]:
    """(where, pod template) of a RayCluster, RayJob or CronJob."""
    spec = document.get("spec", {})
    kind = document.get("kind")
    if kind == "CronJob":
        return [("spec.jobTemplate.spec.template", spec["jobTemplate"]["spec"]["template"])]
    cluster = spec.get("rayClusterSpec") if kind == "RayJob" else spec if kind == "RayCluster" else None
    if not cluster:
        return []
    prefix = "spec.rayClusterSpec" if kind == "RayJob" else "spec"
    groups = [("headGroupSpec", cluster.get("headGroupSpec", {}))]
    groups += [(f"workerGroupSpecs[{g.get('groupName')}]", g) for g in cluster.get("workerGroupSpecs", [])]
    return [(f"{prefix}.{name}.template", group["template"]) for name, group in groups if "template" in group]


def containers_of(document: dict) -> list[tuple[str, dict]]:
    return [
        (f"{where}.containers[{container.get('name')}]", container)
        for where, template in pod_templates(document)
        for container in template.get("spec", {}).get("containers", [])
    ]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    found = [(f"{rel(p)}:{d['metadata']['name']}", d["spec"]) for p, d in kube_objects("RayCluster")]
    for path, job in kube_objects("RayJob"):
        if "rayClusterSpec" in job["spec"]:
            found.append((f"{rel(path)}:rayClusterSpec", job["spec"]["rayClusterSpec"]))
    return found


KUBE_DOCUMENTS = [(path, document) for path in KUBE_FILES for document in documents(path)]


@pytest.mark.parametrize(
    "path, document", KUBE_DOCUMENTS, ids=[f"{rel(p)}:{d.get('kind')}" for p, d in KUBE_DOCUMENTS]
)
def test_kubernetes_manifest_has_the_fields_its_kind_requires(path, document):
    assert check_kube_object(document) == []


@pytest.mark.parametrize(
    "breakage, problem",
    [
        (lambda d: d["spec"].update(shutdownAfterJobFinish=True), "unknown field 'shutdownAfterJobFinish'"),
        (lambda d: d["spec"]["rayClusterSpec"].pop("headGroupSpec"), "missing required field 'headGroupSpec'"),
        (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"), "'groupName'"),
        (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplicas="1"), "expected int"),
        (lambda d: d["spec"].update(submissionMode="K8sMode"), "is not one of"),
        (lambda d: d["spec"]["rayClusterSpec"]["authOptions"].update(mode="on"), "is not one of"),
        (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "string"),
    ],
)
def test_the_kubernetes_checker_rejects_broken_manifests(breakage, problem):
    [(_, job)] = kube_objects("RayJob")
    broken = copy.deepcopy(job)
    breakage(broken)
    assert any(problem in found for found in check_kube_object(broken)), check_kube_object(broken)


def test_kuberay_clusters_have_token_auth_from_a_secret_and_stay_inside_kubernetes():
    specs = ray_cluster_specs()
    assert len(specs) >= 2  # the RayCluster and the RayJob's own cluster
    for where, spec in specs:
        assert spec["rayVersion"] == RAY_VERSION, where
        assert spec["authOptions"]["mode"] == "token", where
        assert spec["authOptions"]["secretName"] == "imgcls-ray-auth", where
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress"), where
        assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP", where
        # No Ray CPUs on the head: drivers with entrypoint CPUs and all work go to workers.
        assert head["rayStartParams"].get("num-cpus") == "0", where
        for group in spec.get("workerGroupSpecs", []):
            replicas = group.get("replicas", group["minReplicas"])
            assert 0 <= group["minReplicas"] <= replicas <= group["maxReplicas"], (where, group["groupName"])
            gpus = [c["resources"].get("limits", {}).get("nvidia.com/gpu") for c in group["template"]["spec"]["containers"]]
            if any(gpus):
                assert group["minReplicas"] == 0, f"{where}: GPU workers must be optional"


def test_kuberay_pods_get_s3_credentials_only_from_a_secret():
    for path, document in kube_objects():
        for where, container in containers_of(document):
            if document["kind"] == "CronJob":
                continue  # the submitter needs no S3 access
            sources = [source.get("secretRef", {}).get("name") for source in container.get("envFrom", [])]
            assert "imgcls-s3" in sources, f"{rel(path)}: {where}"


def test_kuberay_training_job_runs_the_train_entrypoint_of_the_image():
    [(path, job)] = kube_objects("RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    assert spec["entrypointNumCpus"] >= 1
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))
    entrypoint = shlex.split(spec["entrypoint"])
    assert entrypoint[:2] == ["python", f"{image_workdir()}/jobs/train.py"]
    assert_image_paths_exist(entrypoint)
    assert_valid_imgcls_command("train", entrypoint[2:])


def assert_valid_imgcls_command(verb: str, arguments: list[str]) -> None:
    """The arguments parse with imgcls' own CLI; a training config loads with its overrides."""
    from imgcls.cli import build_parser

    parsed = build_parser().parse_args([verb, *arguments])
    if verb == "train":
        from imgcls.config import load_job_config

        config_path = REPO_ROOT / Path(parsed.config).relative_to(image_workdir())
        load_job_config(config_path, parsed.overrides)
    else:
        from imgcls.config import PredictConfig, build_model, merge, parse_overrides

        values = {"model": parsed.model, "input": parsed.input, "output": parsed.output}
        build_model(PredictConfig, merge(values, parse_overrides(parsed.overrides)), "predict arguments")


def image_workdir() -> str:
    [workdir] = re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.M)
    return workdir


def assert_image_paths_exist(arguments: list[str]) -> None:
    """Paths under the image's checkout (/home/ray/imgcls) name files that the Dockerfile copies."""
    copied = re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", DOCKERFILE.read_text(), re.M)
    sources = [source for line in copied for source in line.split()]
    for argument in arguments:
        if argument.startswith(image_workdir() + "/"):
            relative = argument[len(image_workdir()) + 1 :]
            assert (REPO_ROOT / relative).exists(), argument
            assert any(relative == s or relative.startswith(s.rstrip("/") + "/") for s in sources), argument


CRON_FIELD_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def valid_cron(expression: str) -> bool:
    fields = expression.split()
    if len(fields) != 5:
        return False
    for field, (low, high) in zip(fields, CRON_FIELD_RANGES):
        for part in field.split(","):
            match = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", part)
            if not match:
                return False
            numbers = [int(n) for n in match.group(2, 3) if n is not None]
            if any(not low <= n <= high for n in numbers) or (match.group(4) and int(match.group(4)) == 0):
                return False
    return True


def test_cron_check_accepts_and_rejects():
    assert valid_cron("0 2 * * *") and valid_cron("*/15 1-5 * * 1,3")
    assert not valid_cron("0 24 * * *") and not valid_cron("0 2 * *") and not valid_cron("@nightly x")


def test_nightly_schedule_submits_predict_to_the_raycluster_with_the_token_from_a_secret():
    [(path, cronjob)] = kube_objects("CronJob")
    spec = cronjob["spec"]
    assert valid_cron(spec["schedule"])
    assert spec["concurrencyPolicy"] == "Forbid"  # one writer per output at a time
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0 and job["template"]["spec"]["restartPolicy"] == "Never"
    [container] = job["template"]["spec"]["containers"]
    env = {item["name"]: item for item in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    token_ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    [(_, cluster)] = kube_objects("RayCluster")
    assert token_ref == {"name": cluster["spec"]["authOptions"]["secretName"], "key": "auth_token"}
    assert env["RAY_ADDRESS"]["value"] == f"http://{cluster['metadata']['name']}-head-svc:8265"

    # cluster/submit.sh from the image: `ray job submit`, then the job's own exit code.
    command = container["command"]
    assert command[0] == f"{image_workdir()}/cluster/submit.sh"
    assert_image_paths_exist(command)
    options, entrypoint = command[1 : command.index("--")], command[command.index("--") + 1 :]
    assert "--entrypoint-num-cpus=1" in options
    [runtime_env] = [o.split("=", 1)[1] for o in options if o.startswith("--runtime-env-json=")]
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**json.loads(runtime_env))
    assert entrypoint[:2] == ["python", f"{image_workdir()}/jobs/predict.py"]
    assert_valid_imgcls_command("predict", entrypoint[2:])


def test_images_and_versions_agree_with_the_installed_ray():
    dockerfile = DOCKERFILE.read_text()
    assert f"ARG BASE_IMAGE=rayproject/ray:{RAY_VERSION}-py311-cpu" in dockerfile
    assert f"rayproject/ray:{RAY_VERSION}-py311-gpu" in dockerfile
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    major_minor = ".".join(RAY_VERSION.split(".")[:2])
    assert f"ray[data,train,tune,default]=={major_minor}.*" in pyproject
    images = {container["image"] for _, document in kube_objects() for _, container in containers_of(document)}
    assert {image.rsplit(":", 1)[0] for image in images} == {"registry.example.com/imgcls"}, images


# --------------------------------------------------------------------------------------------------
# No secret values anywhere under cluster/.

SECRET_PATTERNS = {
    "an AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "an AWS secret key with a value": re.compile(r"(?i)aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+]{16,}"),
    "a Ray token with a value": re.compile(r"RAY_AUTH_TOKEN\s*[=:]\s*['\"]?[A-Za-z0-9+/_.-]{8,}"),
    "a bearer token": re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/-]{16,}"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "a long hex string": re.compile(r"\b[0-9a-fA-F]{32,}\b"),
}
BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{40,}={0,2}")
SECRET_KEY_NAME = re.compile(r"(?i)(auth_token|^token$|password|passwd|access_key|secret_key|api_key|credentials?$)")
REFERENCE = re.compile(r"^(~/|/|\./|\$)")  # a file path or a variable: where the secret is, not what


def secrets_in_text(text: str) -> list[str]:
    found = [name for name, pattern in SECRET_PATTERNS.items() if pattern.search(text)]
    for run in BASE64_RUN.findall(text):
        if re.search(r"[A-Z]", run) and re.search(r"[a-z]", run) and re.search(r"\d", run) and run.count("/") * 8 < len(run):
            found.append("a long base64 string")
    return found


def secrets_in_yaml(node, where: str = "") -> list[str]:
    """Literal values where a reference belongs: env entries and keys named like secrets, Secret objects."""
    found = []
    if isinstance(node, dict):
        if node.get("kind") == "Secret" and ({"data", "stringData"} & set(node)):
            found.append(f"{where}: a Secret with values")
        name, value = node.get("name"), node.get("value")
        if isinstance(name, str) and SECRET_KEY_NAME.search(name) and value is not None:
            found.append(f"{where}: env {name} has a literal value")
        for key, item in node.items():
            if SECRET_KEY_NAME.search(str(key)) and isinstance(item, (str, int)) and not REFERENCE.match(str(item)):
                found.append(f"{where}.{key}: a literal value")
            found += secrets_in_yaml(item, f"{where}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += secrets_in_yaml(item, f"{where}[{i}]")
    return found


@pytest.mark.parametrize("path", ALL_FILES, ids=rel)
def test_no_secret_values_under_cluster(path):
    assert secrets_in_text(path.read_text()) == [], rel(path)
    if path in YAML_FILES:
        assert [problem for document in documents(path) for problem in secrets_in_yaml(document)] == []


def fake(*parts: str) -> str:
    """Secret-shaped samples, assembled at run time so that no scanner mistakes this file for a leak."""
    return "".join(parts)


@pytest.mark.parametrize(
    "text",
    [
        fake("aws_access_key_id = AKIA", "IMGCLSSAMPLE0001"),
        fake("aws_secret_access_key: ", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSAMPLE"),
        fake("export RAY_AUTH_TOKEN=", "d08d5239e4041d9296fbaa3a8a450fcc"),
        fake("curl -H 'Authorization: Bearer ", "abcdef0123456789abcdef'"),
        fake("-----BEGIN OPENSSH ", "PRIVATE KEY-----"),
        fake("token: ", "Zm9vYmFyYmF6cXV4UXV1eDEyMzQ1Njc4OTBhYmNkZWZn"),
    ],
)
def test_the_secret_scan_finds_secret_values_in_text(text):
    assert secrets_in_text(text)


@pytest.mark.parametrize(
    "document",
    [
        {"env": [{"name": "RAY_AUTH_TOKEN", "value": "x"}]},
        {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]},
        {"apiVersion": "v1", "kind": "Secret", "stringData": {"auth_token": "x"}},
        {"provider": {"aws_secret_access_key": "x"}},
    ],
)
def test_the_secret_scan_finds_literal_values_in_yaml(document):
    assert secrets_in_yaml(document)


def test_the_secret_scan_lets_references_pass():
    text = (
        "valueFrom: {secretKeyRef: {name: imgcls-ray-auth, key: auth_token}}\n"
        "RAY_AUTH_TOKEN_PATH=$HOME/.ray/imgcls-aws-token /home/ray/imgcls/examples/configs/digits.yaml\n"
        "rayproject/ray:2.60.0-py311-gpu --from-env-file=imgcls-s3.env AWS_SECRET_ACCESS_KEY lines\n"
    )
    assert secrets_in_text(text) == []
    assert secrets_in_yaml({"file_mounts": {"~/.ray/auth_token": "~/.ray/imgcls-aws-token"}}) == []
    assert secrets_in_yaml({"env": [{"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {}}}]}) == []


# --------------------------------------------------------------------------------------------------
# Scripts and the README's Operations section.

SCRIPTS = [path for path in ALL_FILES if path.suffix == ".sh"]


@pytest.mark.parametrize("path", SCRIPTS, ids=rel)
def test_scripts_are_executable_bash_without_syntax_errors(path):
    assert path.stat().st_mode & stat.S_IXUSR, f"{rel(path)} is not executable"
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    checked = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_make_token_creates_a_private_token_and_keeps_an_existing_one(tmp_path):
    token = tmp_path / "new" / "auth_token"
    subprocess.run([str(CLUSTER / "make_token.sh"), str(token)], check=True)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    value = token.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", value)
    token.chmod(0o644)
    subprocess.run([str(CLUSTER / "make_token.sh"), str(token)], check=True)
    assert token.read_text() == value and stat.S_IMODE(token.stat().st_mode) == 0o600


def readme_operations() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    start = readme.index("\n## Operations\n")
    end = readme.find("\n## ", start + 1)
    return readme[start : end if end != -1 else len(readme)]


def test_readme_operations_covers_each_way_of_running_and_names_real_files():
    section = readme_operations()
    for topic in ("cluster/local/start.sh", "ray up cluster/aws/cluster.yaml", "cluster/kuberay/", "CronJob",
                  "--runtime-env cluster/runtime_env.yaml --entrypoint-num-cpus 1", "RAY_AUTH_MODE=token", "logs"):  # fmt: skip
        assert topic in section, topic
    for mentioned in set(re.findall(r"\bcluster/[\w./-]*[\w]", section)):
        assert (REPO_ROOT / mentioned).exists(), mentioned
