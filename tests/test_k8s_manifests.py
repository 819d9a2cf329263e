"""The KubeRay manifests in deploy/k8s: what the operator (ray-operator/controllers/ray/utils/validation.go, the
RayCluster/RayJob/RayService CRDs) would refuse, and what would break at run time (the entrypoint, the Serve
application, the images' Ray version, GPUs, S3 credentials). Offline: nothing is applied anywhere."""
import importlib.util
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from tests.cluster_helpers import ROOT, clean_env, pinned_ray_version

DEPLOY = ROOT / "deploy"
RAYJOB, RAYSERVICE = DEPLOY / "k8s" / "rayjob.yaml", DEPLOY / "k8s" / "rayservice.yaml"
SERVE_CONFIG = DEPLOY / "serve_config.yaml"
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = 47            # KubeRay: RayJob and RayService names <= 53 - 6 (the RayCluster name gets a suffix)
RAY_RESOURCE_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")
S3_SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def load(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert len(docs) == 1, f"{path}: one manifest per file"
    return docs[0]


def cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec" if manifest["kind"] == "RayJob" else "rayClusterConfig"]


def groups(spec: dict) -> list[tuple[str, dict]]:
    """(name, group spec) of the head group and every worker group."""
    return [("head", spec["headGroupSpec"])] + [(g.get("groupName", "?"), g) for g in spec.get("workerGroupSpecs", [])]


def ray_containers(spec: dict) -> list[tuple[str, dict]]:
    """The Ray container of each group (KubeRay's RayContainerIndex: the first one)."""
    return [(name, g["template"]["spec"]["containers"][0]) for name, g in groups(spec)]


# -- one rule each: a list of what breaks it (empty: fine) ------------------------------------------------------

def metadata_errors(manifest: dict) -> list[str]:
    name = manifest.get("metadata", {}).get("name", "")
    errs = [] if DNS1035.match(name) else [f"metadata.name {name!r} is not a DNS-1035 label"]
    return errs + ([f"metadata.name {name!r} is longer than {MAX_NAME}"] if len(name) > MAX_NAME else [])


def head_group_errors(spec: dict) -> list[str]:
    head = spec.get("headGroupSpec")
    if not head:
        return ["headGroupSpec is required"]
    if not head.get("template", {}).get("spec", {}).get("containers"):
        return ["headGroupSpec.template needs at least one container"]
    return []


def worker_group_errors(spec: dict) -> list[str]:
    errs, seen = [], set()
    for i, g in enumerate(spec.get("workerGroupSpecs", [])):
        name = g.get("groupName")
        if not name or not DNS1035.match(name) or len(name) > 63:
            errs.append(f"workerGroupSpecs[{i}].groupName {name!r} is missing or not a DNS-1035 label")
        if name in seen:
            errs.append(f"groupName {name!r} is used twice")
        seen.add(name)
        if not g.get("template", {}).get("spec", {}).get("containers"):
            errs.append(f"group {name}: template needs at least one container")
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if not spec.get("enableInTreeAutoscaling") and (lo is None or hi is None):
            errs.append(f"group {name}: minReplicas and maxReplicas are required without autoscaling")
        lo, hi = 0 if lo is None else lo, 2**31 - 1 if hi is None else hi
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi):
            errs.append(f"group {name}: needs 0 <= minReplicas ({lo}) <= maxReplicas ({hi})")
        elif g.get("replicas") is not None and not lo <= g["replicas"] <= hi:
            errs.append(f"group {name}: replicas {g['replicas']} outside [{lo}, {hi}]")
    return errs


def ray_start_params_errors(spec: dict) -> list[str]:
    """rayStartParams is map[string]string (an unquoted 0 is refused by the API server); resources go either
    there or in the group's `resources`, not both."""
    errs = []
    for name, g in groups(spec):
        params = g.get("rayStartParams")
        if params is None:
            errs.append(f"group {name}: rayStartParams is required (may be {{}})")
            continue
        errs += [f"group {name}: rayStartParams[{k!r}] = {v!r} is not a string"
                 for k, v in params.items() if not isinstance(v, str)]
        if "labels" in params:
            errs.append(f"group {name}: rayStartParams['labels'] is refused; use the group's labels")
        if any(k in params for k in RAY_RESOURCE_PARAMS) and g.get("resources"):
            errs.append(f"group {name}: resources in both rayStartParams and resources")
    return errs


def autoscaling_errors(spec: dict) -> list[str]:
    if spec.get("enableInTreeAutoscaling") is not True:
        return ["enableInTreeAutoscaling must be true"]
    opts = spec.get("autoscalerOptions") or {}
    errs = [] if opts.get("idleTimeoutSeconds", 0) >= 0 else ["autoscalerOptions.idleTimeoutSeconds < 0"]
    if opts.get("version") == "v2":   # autoscaler v2 wants pods that are never restarted in place
        errs += [f"group {name}: restartPolicy must be Never or unset with autoscaler v2"
                 for name, g in groups(spec) if g["template"]["spec"].get("restartPolicy") not in (None, "Never")]
    else:
        errs += [f"group {g['groupName']}: idleTimeoutSeconds needs autoscaler v2"
                 for g in spec.get("workerGroupSpecs", []) if "idleTimeoutSeconds" in g]
    return errs


def head_work_errors(spec: dict) -> list[str]:
    return [] if spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0" else [
        "the head must schedule no work: rayStartParams num-cpus \"0\""]


def gpu_group_errors(spec: dict) -> list[str]:
    """A GPU group asks Kubernetes for nvidia.com/gpu and tells Ray as many; it scales from zero."""
    gpu_groups = [g for g in spec.get("workerGroupSpecs", [])
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})]
    if not gpu_groups:
        return ["no worker group requests nvidia.com/gpu"]
    errs = []
    for g in gpu_groups:
        res = g["template"]["spec"]["containers"][0]["resources"]
        n = int(res["limits"]["nvidia.com/gpu"])
        if n < 1:
            errs.append(f"group {g['groupName']}: nvidia.com/gpu limit {n} < 1")
        if "nvidia.com/gpu" in res.get("requests", {}) and int(res["requests"]["nvidia.com/gpu"]) != n:
            errs.append(f"group {g['groupName']}: GPU requests and limits differ")
        if g.get("rayStartParams", {}).get("num-gpus") != str(n):
            errs.append(f"group {g['groupName']}: rayStartParams num-gpus should be \"{n}\"")
        if g.get("minReplicas", 0) != 0:
            errs.append(f"group {g['groupName']}: GPU nodes should scale from minReplicas 0")
    return errs


def credential_errors(spec: dict) -> list[str]:
    """Every Ray container gets the S3 keys from a Secret (env valueFrom.secretKeyRef), none as literal values or
    as mounted credential files."""
    errs = []
    for name, c in ray_containers(spec):
        env = {e["name"]: e for e in c.get("env", [])}
        for var in S3_SECRET_VARS:
            ref = env.get(var, {}).get("valueFrom", {}).get("secretKeyRef", {})
            if not (ref.get("name") and ref.get("key")) or "value" in env.get(var, {}):
                errs.append(f"group {name}: {var} must come from env valueFrom.secretKeyRef")
        errs += [f"group {name}: mounts credential files at {m['mountPath']}" for m in c.get("volumeMounts", [])
                 if ".aws" in m["mountPath"] or "credentials" in m["mountPath"]]
        errs += [f"group {name}: AWS_SHARED_CREDENTIALS_FILE points at a file" for v in env
                 if v == "AWS_SHARED_CREDENTIALS_FILE"]
    return errs


def image_errors(spec: dict, ray_version: str, project_version: str) -> list[str]:
    """rayVersion is the pinned Ray; each image is the stock Ray image of that version or this project's image
    (built FROM it by deploy/Dockerfile) tagged with the project's version."""
    errs = [] if spec.get("rayVersion") == ray_version else [f"rayVersion {spec.get('rayVersion')!r} != {ray_version}"]
    for name, c in ray_containers(spec):
        repo, _, tag = c["image"].rpartition(":")
        ok = (tag == ray_version or tag.startswith(ray_version + "-")) if repo == "rayproject/ray" else (
            repo.endswith("/dwf-ray") and (tag == project_version or tag.startswith(project_version + "-")))
        if not ok:
            errs.append(f"group {name}: image {c['image']} is neither rayproject/ray:{ray_version}[-...] nor "
                        f".../dwf-ray:{project_version}[-...]")
    return errs


def entrypoint_errors(manifest: dict) -> list[str]:
    """The RayJob's entrypoint runs a script of this repository, against an S3 run root."""
    spec, errs = manifest["spec"], []
    argv = shlex.split(spec.get("entrypoint", ""))
    scripts = [a for a in argv if a.endswith(".py")]
    if argv[:1] != ["python"] or not scripts:
        return [f"entrypoint {spec.get('entrypoint')!r} is not `python <script>.py ...`"]
    if not (ROOT / scripts[0]).is_file():
        errs.append(f"entrypoint script {scripts[0]} is not in the repository")
    if "--root" not in argv or not argv[argv.index("--root") + 1].startswith("s3://"):
        errs.append("the entrypoint's --root must be an s3:// run root (pods have no shared disk)")
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
        errs.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
    try:
        yaml.safe_load(spec.get("runtimeEnvYAML", "") or "{}")
    except yaml.YAMLError as exc:
        errs.append(f"runtimeEnvYAML does not parse: {exc}")
    return errs


def cluster_rules(spec: dict, ray_version: str, project_version: str) -> list[str]:
    return (head_group_errors(spec) + worker_group_errors(spec) + ray_start_params_errors(spec)
            + autoscaling_errors(spec) + head_work_errors(spec) + gpu_group_errors(spec) + credential_errors(spec)
            + image_errors(spec, ray_version, project_version))


# -- the manifests --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def versions():
    import tomllib
    return pinned_ray_version(), tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.mark.parametrize("path, kind", [(RAYJOB, "RayJob"), (RAYSERVICE, "RayService")])
def test_manifest_passes_the_operators_rules(path, kind, versions):
    manifest = load(path)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == kind
    errors = metadata_errors(manifest) + cluster_rules(cluster_spec(manifest), *versions)
    if kind == "RayJob":
        errors += entrypoint_errors(manifest)
    assert not errors, "\n".join(errors)


def test_the_validators_catch_what_the_operator_refuses(versions):
    """Each rule fails on a manifest that breaks it (so that the test above can fail)."""
    good = load(RAYJOB)
    spec = cluster_spec(good)
    bad_name = good | {"metadata": {"name": "DWF_job"}}
    assert metadata_errors(bad_name) and metadata_errors(good | {"metadata": {"name": "a" * 48}})
    assert head_group_errors({})
    assert worker_group_errors({"workerGroupSpecs": [spec["workerGroupSpecs"][0] | {"minReplicas": 3,
                                                                                    "maxReplicas": 2}]})
    assert worker_group_errors({"workerGroupSpecs": [spec["workerGroupSpecs"][0] | {"groupName": "CPU_group"}]})
    assert ray_start_params_errors({"headGroupSpec": spec["headGroupSpec"] | {"rayStartParams": {"num-cpus": 0}}})
    assert head_work_errors({"headGroupSpec": {"rayStartParams": {}}})
    no_gpu = spec | {"workerGroupSpecs": spec["workerGroupSpecs"][:1]}
    assert gpu_group_errors(no_gpu)
    head = spec["headGroupSpec"]
    container = head["template"]["spec"]["containers"][0]
    literal = container | {"env": [{"name": v, "value": "x"} for v in S3_SECRET_VARS]}
    leaky = spec | {"headGroupSpec": head | {"template": {"spec": {"containers": [literal]}}}}
    assert credential_errors(leaky)
    old = container | {"image": "rayproject/ray:2.52.0"}
    assert image_errors(spec | {"headGroupSpec": head | {"template": {"spec": {"containers": [old]}}}}, *versions)
    assert entrypoint_errors({"spec": {"entrypoint": "python jobs/nope.py run --root s3://b/r"}})
    assert entrypoint_errors({"spec": {"entrypoint": "python jobs/run.py run --root runs/demo"}})


def test_rayjob_entrypoint_runs_and_names_a_preset():
    """The entrypoint's script starts (`python jobs/run.py presets`) and knows the preset the RayJob runs."""
    argv = shlex.split(load(RAYJOB)["spec"]["entrypoint"])
    out = subprocess.run([sys.executable, argv[1], "presets"], cwd=ROOT, env=clean_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert argv[argv.index("--preset") + 1] in out.stdout.split()


def test_rayjob_working_dir_is_where_the_image_puts_the_code():
    runtime_env = yaml.safe_load(load(RAYJOB)["spec"]["runtimeEnvYAML"])
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert workdirs and runtime_env["working_dir"] == workdirs[-1]


def test_dockerfile_builds_from_the_pinned_ray_and_installs_this_project(versions):
    text = (DEPLOY / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    base = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], base)
    assert base == f"rayproject/ray:{versions[0]}-py311", base
    copied = [p for src in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)\s+\S+$", text, re.M) for p in src.split()]
    assert not [p for p in copied if not (ROOT / p).exists()], f"COPY of paths not in the repository: {copied}"
    assert {"pyproject.toml", "dwf_ray", "jobs"} <= set(copied), f"the image lacks the package or jobs/: {copied}"
    assert re.search(r"pip install[^\n]*\s\.(\s|$)", text), "the Dockerfile does not pip install this project"


def test_every_ray_image_named_in_deploy_and_cluster_yaml_is_the_pinned_version(versions):
    files = [*DEPLOY.rglob("*"), ROOT / "cluster.yaml"]
    tags = [(f.name, t) for f in files if f.is_file() for t in re.findall(r"rayproject/ray:([\w.\-]+)", f.read_text())]
    assert tags
    wrong = [(f, t) for f, t in tags if not (t == versions[0] or t.startswith(versions[0] + "-"))]
    assert not wrong, f"Ray images not at {versions[0]}: {wrong}"


# -- the Serve config ------------------------------------------------------------------------------------------

def test_rayservice_serve_config_equals_the_serve_config_file():
    serve_v2 = load(RAYSERVICE)["spec"]["serveConfigV2"]
    assert isinstance(serve_v2, str), "serveConfigV2 is a YAML string (a block scalar)"
    assert yaml.safe_load(serve_v2) == yaml.safe_load(SERVE_CONFIG.read_text())


def test_serve_config_is_a_valid_serve_deploy_config():
    from ray.serve.schema import ServeDeploySchema
    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    [app] = config.applications
    assert (app.name, app.import_path, app.route_prefix) == ("dwf", "dwf_ray.serve.app:build_app", "/")
    assert app.args["root"].startswith("s3://")
    # where args and the deployment override set the same option, they agree
    for dep in app.deployments:
        for key, value in dep.model_dump(exclude_unset=True).items():
            if key in app.args:
                assert app.args[key] == value, f"{dep.name}.{key}: {value} in deployments, {app.args[key]} in args"


def test_serve_config_names_an_application_and_deployments_that_exist(s3_server):
    """import_path's module is in the repository and has the builder; the deployments it overrides exist; the
    builder accepts the args (it stops only at the run root, which holds no finished run here)."""
    app_cfg = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]
    module_name, _, attr = app_cfg["import_path"].partition(":")
    spec = importlib.util.find_spec(module_name)
    assert spec is not None and spec.origin and (ROOT / "dwf_ray" / "serve" / "app.py").samefile(spec.origin), (
        f"{module_name} is not importable from this repository")
    module = importlib.import_module(module_name)
    build_app = getattr(module, attr, None)
    assert callable(build_app), f"{module_name} has no {attr}"
    from ray import serve
    deployments = {v.name for v in vars(module).values() if isinstance(v, serve.Deployment)}
    named = {d["name"] for d in app_cfg.get("deployments", [])}
    assert named <= deployments, f"the config overrides deployments the app does not have: {named - deployments}"
    bucket = s3_server()   # an empty bucket on the moto server: a valid store without a finished run
    args = app_cfg["args"] | {"root": f"s3://{bucket}/runs/none"}
    with pytest.raises(FileNotFoundError, match="flow"):
        build_app(args)
    with pytest.raises(ValueError):   # pydantic's ValidationError too: an unknown key fails before the root
        build_app(args | {"max_ongoing_request": 64})
