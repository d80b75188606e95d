"""The Kubernetes Job a placed stage becomes, rendered by Prefect's own Kubernetes worker code (no cluster).

deployments/k8s/gpu-base-job-template.json is the GPU pool's base job template; deployments/prefect-k8s.yaml holds
the stage deployments. The rendering is the worker's: the deployment's job variables are templated as `prefect
deploy` templates them (the environment, then the build step's outputs), merged over the template with
`KubernetesWorkerJobConfiguration.from_template_and_values`, and finished with `prepare_for_flow_run` for an
in-memory flow run of the `finetune-stage/train` deployment (real Prefect schema objects). What comes out is the
manifest the worker would send to the cluster's API.

The store's credentials are in this process's environment, as on a worker's machine: they must reach the pod only
as `secretKeyRef`s to the Kubernetes Secret, never as a value in the manifest.
"""

from __future__ import annotations

import ast
import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import Flow, FlowRun, WorkPool
from prefect.client.schemas.responses import DeploymentResponse
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
from prefect.utilities.templating import apply_values
from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "deployments" / "k8s" / "gpu-base-job-template.json"
PREFECT_K8S = ROOT / "deployments" / "prefect-k8s.yaml"

# The contract with the placement code (flows/placed.py): one deployment per placed stage, named after it, of the
# flow `finetune-stage`; the train stage's pool is called `gpu` in the examples.
STAGE_FLOW = "finetune-stage"
STAGE_ENTRYPOINT = "flows/placed.py:placed_stage"
BUILT_IMAGE = "registry.example.com/team/finetune-pipeline:2026-01-01t00-00-00"
API_URL = "http://prefect-server.prefect.svc.cluster.local:4200/api"
FAKE_KEY_ID = "AKIAK8STESTKEYID0042"
FAKE_SECRET = "k8s-test-secret-value/do-not-leak+42"
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION")


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return json.loads(TEMPLATE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def prefect_k8s() -> dict[str, Any]:
    return yaml.safe_load(PREFECT_K8S.read_text(encoding="utf-8"))


@pytest.fixture
def worker_env(monkeypatch):
    """The worker machine's environment: the store's credentials, as a worker started by hand would have them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("FINETUNE_IMAGE", BUILT_IMAGE.split(":")[0])


def deployment_spec(prefect_k8s: dict[str, Any], name: str) -> dict[str, Any]:
    """The deployment called `name` in prefect-k8s.yaml, templated as `prefect deploy` does: first with the
    environment (`{{ $VAR }}`), then with the build step's outputs (`{{ build-image.image }}`)."""
    (spec,) = [d for d in prefect_k8s["deployments"] if d["name"] == name]
    spec = apply_values(copy.deepcopy(spec), dict(__import__("os").environ), remove_notset=False)
    build_outputs = {"build-image": {"image": BUILT_IMAGE, "image_name": BUILT_IMAGE.split(":")[0]}}
    return apply_values(spec, build_outputs)


def render_job(
    template: dict[str, Any],
    spec: dict[str, Any],
    flow_name: str,
    run_job_variables: dict[str, Any] | None = None,
) -> KubernetesWorkerJobConfiguration:
    """The worker's job configuration for one flow run of the deployment `spec` on a pool with `template`.

    `run_job_variables` are a run's own (run_deployment's job_variables, e.g. placement.train.job_variables); they
    are merged over the deployment's as the worker's `resolve_for_flow_run` merges them (env key by key, the rest
    replaced), which needs a server to read the deployment, so the merge is done here on the same objects.
    """
    flow = Flow(name=flow_name)
    pool = WorkPool(name=spec["work_pool"]["name"], type="kubernetes", base_job_template=template)
    deployment = DeploymentResponse(
        name=spec["name"],
        flow_id=flow.id,
        entrypoint=spec["entrypoint"],
        parameters=spec["parameters"],
        work_pool_name=pool.name,
        work_queue_name=spec["work_pool"]["work_queue_name"],
        job_variables=spec["work_pool"]["job_variables"],
    )
    flow_run = FlowRun(
        name="placed-train-run",
        flow_id=flow.id,
        deployment_id=deployment.id,
        work_pool_name=pool.name,
        parameters={"stage": "train"},
        job_variables=run_job_variables or {},
    )
    values = copy.deepcopy(deployment.job_variables)
    run_values = copy.deepcopy(flow_run.job_variables)
    if isinstance(values.get("env"), dict):
        values["env"].update(run_values.pop("env", {}))
    values.update(run_values)
    # A client that is never opened: rendering this template reads no block or variable from the API (a template
    # that did would fail here instead of silently rendering without it).
    client = PrefectClient(api="http://127.0.0.1:9/api")
    configuration = asyncio.run(
        KubernetesWorkerJobConfiguration.from_template_and_values(template, values, client=client)
    )
    configuration.prepare_for_flow_run(flow_run, deployment, flow, pool, worker_name="gpu-worker-0")
    return configuration


def container(manifest: dict[str, Any]) -> dict[str, Any]:
    (only,) = manifest["spec"]["template"]["spec"]["containers"]
    return only


def env_by_name(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container(manifest)["env"]}


def leaked(manifest: dict[str, Any], secrets: tuple[str, ...]) -> list[str]:
    """The secret values that appear anywhere in the manifest's JSON (also inside longer strings)."""
    text = json.dumps(manifest)
    return [secret for secret in secrets if secret in text]


def test_stage_deployments_follow_the_placement_contract(prefect_k8s):
    stages = {d["name"]: d for d in prefect_k8s["deployments"] if d["entrypoint"] == STAGE_ENTRYPOINT}
    assert set(stages) == {"train", "evaluate", "benchmark"}
    assert stages["train"]["work_pool"]["name"] == "gpu"
    for spec in stages.values():
        # Parameters come from the parent run; nothing in the deployment may look like a credential.
        assert spec["parameters"] == {}
        assert not any(name in json.dumps(spec) for name in S3_ENV)


def declared_flow_name(path: Path, function: str) -> str:
    """The `name=` of the `@flow(...)` decorator on `function` in `path`, read with ast (a string, or a module-level
    string constant), so the check costs no import of the flow's module (which imports every stage)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    constants = {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    (definition,) = [
        n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == function
    ]
    for decorator in definition.decorator_list:
        callee = decorator.func if isinstance(decorator, ast.Call) else decorator
        if (getattr(callee, "id", None) or getattr(callee, "attr", None)) != "flow" or not isinstance(
            decorator, ast.Call
        ):
            continue
        for keyword in decorator.keywords:
            if keyword.arg == "name" and isinstance(keyword.value, ast.Constant):
                return keyword.value.value
            if keyword.arg == "name" and isinstance(keyword.value, ast.Name) and keyword.value.id in constants:
                return constants[keyword.value.id]
    raise AssertionError(f"{path.name}:{function} has no @flow(name=...) with a literal or module-level constant name")


def test_declared_flow_name_reads_literals_and_constants(tmp_path):
    script = tmp_path / "placed.py"
    script.write_text(
        'from prefect import flow\nimport prefect\nNAME = "finetune-stage"\n'
        "@flow(name=NAME)\ndef a(): ...\n@prefect.flow(name='x', log_prints=False)\ndef b(): ...\n"
        "@flow\ndef c(): ...\n"
    )
    assert declared_flow_name(script, "a") == "finetune-stage"
    assert declared_flow_name(script, "b") == "x"
    with pytest.raises(AssertionError, match="placed.py:c has no @flow"):
        declared_flow_name(script, "c")


@pytest.mark.parametrize("name", ["k8s", "train", "evaluate", "benchmark"])
def test_deployment_entrypoints_are_flows_of_the_expected_name(prefect_k8s, name):
    """What the pod runs: the entrypoint's function is a flow of the name the worker labels the Job with."""
    (spec,) = [d for d in prefect_k8s["deployments"] if d["name"] == name]
    path, function = spec["entrypoint"].split(":")
    if spec["entrypoint"] == STAGE_ENTRYPOINT and not (ROOT / path).is_file():
        pytest.skip(f"{path} (the stage flow of issue 16's placement) is not in this tree yet")
    expected = STAGE_FLOW if spec["entrypoint"] == STAGE_ENTRYPOINT else "finetune"
    assert declared_flow_name(ROOT / path, function) == expected


def test_train_stage_job_manifest(template, prefect_k8s, worker_env):
    spec = deployment_spec(prefect_k8s, "train")
    with temporary_settings(updates={PREFECT_API_URL: API_URL}):
        configuration = render_job(template, spec, STAGE_FLOW)
    manifest = configuration.job_manifest
    job = container(manifest)
    pod = manifest["spec"]["template"]["spec"]

    assert manifest["kind"] == "Job" and manifest["apiVersion"] == "batch/v1"
    assert job["image"] == BUILT_IMAGE
    assert job["args"] == ["prefect", "flow-run", "execute"]
    assert job["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert {"name": "dshm", "mountPath": "/dev/shm"} in job["volumeMounts"]
    labels = manifest["metadata"]["labels"]
    assert labels["prefect.io/flow-name"] == STAGE_FLOW and labels["prefect.io/deployment-name"] == "train"
    assert labels["prefect.io/work-pool-name"] == "gpu"

    env = env_by_name(manifest)
    assert env["PREFECT_API_URL"]["value"] == API_URL  # the worker's API, so the pod reports its run there
    assert env["PREFECT__FLOW_RUN_ID"]["value"]
    for name in S3_ENV:
        assert "value" not in env[name], name
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "finetune-s3"
        assert env[name]["valueFrom"]["secretKeyRef"]["key"] == name
    assert "optional" not in env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]  # a missing key fails early
    assert leaked(manifest, (FAKE_KEY_ID, FAKE_SECRET)) == []
    assert leaked(json.loads(configuration.model_dump_json()), (FAKE_KEY_ID, FAKE_SECRET)) == []


def test_run_job_variables_pick_the_gpus_of_a_placed_run(template, prefect_k8s, worker_env):
    """placement.train.job_variables reach the pod: four A100s instead of the pool's default one GPU."""
    spec = deployment_spec(prefect_k8s, "train")
    a100 = {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    configuration = render_job(
        template, spec, STAGE_FLOW, {"gpu_count": 4, "node_selector": a100, "memory_limit": "120Gi"}
    )
    job = container(configuration.job_manifest)
    assert job["resources"]["limits"] == {"nvidia.com/gpu": 4, "memory": "120Gi"}
    assert configuration.job_manifest["spec"]["template"]["spec"]["nodeSelector"] == a100
    assert env_by_name(configuration.job_manifest)["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]


def test_parent_flow_on_the_cpu_pool_gets_no_gpu_but_the_same_secret(template, prefect_k8s, worker_env):
    spec = deployment_spec(prefect_k8s, "k8s")
    configuration = render_job(template, spec, "finetune")
    manifest = configuration.job_manifest
    pod = manifest["spec"]["template"]["spec"]
    assert container(manifest)["resources"]["limits"] == {"nvidia.com/gpu": 0}
    assert container(manifest)["resources"]["requests"] == {"cpu": "2", "memory": "8Gi"}
    assert pod["nodeSelector"] == {} and pod["tolerations"] == []
    assert env_by_name(manifest)["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "finetune-s3"
    assert leaked(manifest, (FAKE_KEY_ID, FAKE_SECRET)) == []


def test_a_credential_in_job_variables_would_leak_and_replace_the_secret(template, prefect_k8s, worker_env):
    """The check above can fail: a deployment that puts the key into its env (here from the worker's environment,
    as `{{ $AWS_SECRET_ACCESS_KEY }}` in prefect-k8s.yaml would) writes it into the manifest in clear, and Prefect
    drops the template's secretKeyRef of the same name. So: never set AWS_* in job_variables."""
    spec = copy.deepcopy(prefect_k8s["deployments"])
    (train,) = [d for d in spec if d["name"] == "train"]
    train["work_pool"]["job_variables"]["env"] = {"AWS_SECRET_ACCESS_KEY": "{{ $AWS_SECRET_ACCESS_KEY }}"}
    configuration = render_job(template, deployment_spec({"deployments": spec}, "train"), STAGE_FLOW)
    assert leaked(configuration.job_manifest, (FAKE_KEY_ID, FAKE_SECRET)) == [FAKE_SECRET]
    assert env_by_name(configuration.job_manifest)["AWS_SECRET_ACCESS_KEY"] == {
        "name": "AWS_SECRET_ACCESS_KEY",
        "value": FAKE_SECRET,
    }


def test_api_auth_string_goes_to_a_secret_only_when_the_worker_names_one(template, prefect_k8s, worker_env):
    """A server behind PREFECT_API_AUTH_STRING: the worker copies its own Prefect settings into every job, so the
    string is in the manifest in clear until the worker is told which Secret holds it
    (PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_AUTH_STRING_SECRET_NAME/_KEY, deployments/README.md); then
    `_create_job` swaps it for a secretKeyRef with the step below."""
    auth = "finetune:k8s-test-auth-string"
    spec = deployment_spec(prefect_k8s, "train")
    with temporary_settings(updates={PREFECT_API_URL: API_URL, PREFECT_API_AUTH_STRING: auth}):
        configuration = render_job(template, spec, STAGE_FLOW)
    assert leaked(configuration.job_manifest, (auth,)) == [auth]

    worker = KubernetesWorker(work_pool_name="gpu")
    asyncio.run(
        worker._replace_env_variable_with_secret(
            env_variable_name="PREFECT_API_AUTH_STRING",
            configuration=configuration,
            secret_name="prefect-api-auth",
            secret_key="auth-string",
        )
    )
    assert leaked(configuration.job_manifest, (auth, FAKE_KEY_ID, FAKE_SECRET)) == []
    assert env_by_name(configuration.job_manifest)["PREFECT_API_AUTH_STRING"]["valueFrom"] == {
        "secretKeyRef": {"name": "prefect-api-auth", "key": "auth-string"}
    }


def test_template_extends_prefect_kubernetes_default(template):
    """The template is prefect-kubernetes' own default plus additions: every default variable unchanged, every
    default field of the job configuration kept (so a prefect-kubernetes upgrade that changes them shows here)."""
    default = KubernetesWorker.get_default_base_job_template()
    ours = template["variables"]["properties"]
    for name, schema in default["variables"]["properties"].items():
        assert ours.get(name) == schema, name
    assert set(ours) - set(default["variables"]["properties"]) == {
        "gpu_count",
        "node_selector",
        "tolerations",
        "s3_secret_name",
        "shm_size",
    }
    for key, value in default["job_configuration"].items():
        if key != "job_manifest":
            assert template["job_configuration"][key] == value, key
    ours_job = container(template["job_configuration"]["job_manifest"])
    default_job = container(default["job_configuration"]["job_manifest"])
    # The only default field replaced: env, a list of secretKeyRefs (Prefect prepends its own variables to it).
    assert {k: v for k, v in ours_job.items() if k not in ("env", "resources", "volumeMounts")} == {
        k: v for k, v in default_job.items() if k not in ("env", "resources")
    }
    assert ours_job["resources"]["requests"] == default_job["resources"]["requests"]
    assert ours_job["resources"]["limits"] == {
        **default_job["resources"]["limits"],
        "nvidia.com/gpu": "{{ gpu_count }}",
    }
