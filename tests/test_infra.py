"""Deployable files: ray_cluster.yaml, infra/ (Dockerfile, KubeRay, Kubernetes, cron).

Everything is parsed and checked offline: the cluster-launcher config with Ray's own
validator, the manifests for their wiring (one image, commands that name our entry points
and configs that load, env names the code reads, credentials only by reference).
"""

from __future__ import annotations

import copy
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

import conftest

REPO = Path(conftest.REPO)
INFRA = REPO / "infra"
RAY_CLUSTER_YAML = REPO / "ray_cluster.yaml"

# Environment variables our code (and Ray's token auth, and the MLflow server) reads.
ALLOWED_ENV = {
    "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "RAY_ADDRESS",
    "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "MLFLOW_BACKEND_STORE_URI", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION",
}
# Values that are credentials: only ever from a Secret.
SECRET_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN", "MLFLOW_BACKEND_STORE_URI"}
AWS_KEY_ID_RE = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def load_docs(path: Path) -> list[dict]:
    """All YAML documents of a file (empty documents dropped)."""
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def manifests() -> dict[str, list[dict]]:
    """Every Kubernetes YAML under infra/, keyed by path relative to the repo."""
    return {str(p.relative_to(REPO)): load_docs(p) for p in sorted(INFRA.rglob("*.yaml"))}


def find_kind(kind: str) -> list[dict]:
    return [d for docs in manifests().values() for d in docs if d.get("kind") == kind]


def one(kind: str) -> dict:
    found = find_kind(kind)
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


def walk(obj):
    """Every dict nested anywhere in obj (depth first)."""
    if isinstance(obj, dict):
        yield obj
        for v in obj.values():
            yield from walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from walk(v)


def containers(doc: dict) -> list[dict]:
    """Containers of every pod template in a manifest (head, worker groups, jobs, ...)."""
    return [c for d in walk(doc) for c in d.get("containers", []) if isinstance(c, dict)]


def env_entries(doc: dict) -> list[dict]:
    """Every `env:` entry in a manifest: containers and the KubeRay autoscaler sidecar."""
    return [e for d in walk(doc) for e in d.get("env", []) if isinstance(d.get("env"), list)]


def valid_cron(schedule: str) -> bool:
    """Five numeric cron fields, each `*`, `a`, `a-b`, lists and `/step`, within range."""
    fields = schedule.split()
    if len(fields) != 5:
        return False
    for field, (lo, hi) in zip(fields, CRON_RANGES):
        for part in field.split(","):
            base, _, step = part.partition("/")
            if step and not (step.isdigit() and int(step) > 0):
                return False
            if base == "*":
                continue
            a, _, b = base.partition("-")
            if not a.isdigit() or (b and not b.isdigit()):
                return False
            if not lo <= int(a) <= (int(b) if b else int(a)) <= hi:
                return False
    return True


def config_and_overrides(argv: list[str]) -> tuple[str, list[str]]:
    """The --config path and the key.sub=value overrides of a jobs/*.py command line."""
    cfg = argv[argv.index("--config") + 1]
    overrides = [a for a in argv if "=" in a and not a.startswith("-") and "." in a.split("=")[0]]
    return cfg, overrides


def dockerfile_built_images() -> dict[str, str]:
    """Image names the Dockerfile's documented build commands produce: target -> name."""
    text = (INFRA / "Dockerfile").read_text()
    built = {}
    for m in re.finditer(r"docker build -f infra/Dockerfile (--target (\w+) )?-t (\S+) \.", text):
        built[m.group(2) or "default"] = m.group(3)
    return built


# --- parsing ---------------------------------------------------------------------------


def test_every_yaml_parses_and_names_itself():
    """Each manifest document has apiVersion, kind and metadata.name; nothing is empty."""
    found = manifests()
    assert {"infra/kuberay/rayjob-train.yaml", "infra/kuberay/raycluster.yaml",
            "infra/k8s/reindex-cronjob.yaml", "infra/k8s/mlflow.yaml",
            "infra/k8s/secrets.example.yaml"} <= set(found)
    for path, docs in found.items():
        assert docs, f"{path} has no YAML documents"
        for d in docs:
            assert d.get("apiVersion") and d.get("kind"), f"{path}: document without apiVersion/kind"
            assert d.get("metadata", {}).get("name"), f"{path}: {d['kind']} without metadata.name"
    assert load_docs(RAY_CLUSTER_YAML)


# --- ray_cluster.yaml ------------------------------------------------------------------


def ray_cluster_config() -> dict:
    (cfg,) = load_docs(RAY_CLUSTER_YAML)
    return cfg


def test_ray_cluster_yaml_passes_rays_validator():
    """Ray's launcher validator (JSON schema + node-type checks) accepts the file as is and
    after Ray fills in its AWS defaults, as `ray up` does before launching (no cloud calls)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = ray_cluster_config()
    validate_config(copy.deepcopy(cfg))
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head-cpu"
    # Our setup commands run before the head-only ones on the head, alone on workers.
    assert prepared["head_setup_commands"][: len(cfg["setup_commands"])] == cfg["setup_commands"]
    assert prepared["worker_setup_commands"] == cfg["setup_commands"]


def test_rays_validator_rejects_a_broken_config():
    """The validator used above is not a rubber stamp: it refuses broken variants."""
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    no_head = ray_cluster_config()
    del no_head["head_node_type"]
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(no_head)
    typo = ray_cluster_config()
    typo["max_worker"] = typo.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(typo)
    too_many = ray_cluster_config()
    too_many["available_node_types"]["gpu-worker"]["min_workers"] = too_many["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(too_many)


def test_ray_cluster_node_types_and_autoscaling_bounds():
    """CPU head that launches no workers of its type, a GPU worker type for training and
    encoding, a CPU worker type for data, every type with bounds within the global cap."""
    cfg = ray_cluster_config()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["max_workers"] == 0 and head["resources"].get("GPU", 0) == 0
    gpu = [t for n, t in types.items() if t["resources"].get("GPU", 0) >= 1]
    cpu = [t for n, t in types.items()
           if n != cfg["head_node_type"] and t["resources"].get("GPU", 0) == 0 and t["resources"].get("CPU", 0) > 0]
    assert len(gpu) == 1 and len(cpu) == 1
    for t in gpu + cpu:
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"]
        assert t["max_workers"] >= 1, "a worker type that can never start"
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cfg["max_workers"]


def test_ray_cluster_uses_instance_profiles_not_keys():
    """S3 access comes from IAM instance profiles; no key material in the file."""
    cfg = ray_cluster_config()
    text = RAY_CLUSTER_YAML.read_text()
    for name, t in cfg["available_node_types"].items():
        assert t["node_config"].get("IamInstanceProfile", {}).get("Name"), f"{name} has no instance profile"
    assert not AWS_KEY_ID_RE.search(text)
    lowered = text.lower()
    for word in ("aws_secret_access_key", "aws_access_key_id", "secret_key", "password"):
        assert word not in lowered, f"ray_cluster.yaml mentions {word}"
    env_file = REPO / "cluster" / "aws.env"
    assert env_file.exists(), "start commands source cluster/aws.env"
    names = {ln.split("=", 1)[0].strip() for ln in env_file.read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")}
    assert names <= ALLOWED_ENV - SECRET_ENV, f"aws.env sets {names - (ALLOWED_ENV - SECRET_ENV)}"


def test_ray_cluster_installs_the_mounted_working_tree():
    """file_mounts copy the repo ('.') to a node path, and setup_commands pip-install that
    path in editable mode with the gpu extra; Ray starts with token auth on loopback."""
    cfg = ray_cluster_config()
    remote = [r for r, local in cfg["file_mounts"].items() if local in (".", "./")]
    assert len(remote) == 1
    mount = remote[0].replace("~", "$HOME")
    installs = [c for c in cfg["setup_commands"] if "pip install -e" in c]
    assert installs and f'"{mount}[gpu]"' in installs[0], installs
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    head_start = " ".join(cfg["head_start_ray_commands"])
    worker_start = " ".join(cfg["worker_start_ray_commands"])
    assert "--head" in head_start and "--dashboard-host=127.0.0.1" in head_start
    for cmds in (head_start, worker_start):
        assert "export RAY_AUTH_MODE=token" in cmds
        assert "cluster/aws.env" in cmds


# --- one image, one Ray version --------------------------------------------------------


def test_same_image_for_raycluster_rayjob_and_cronjob():
    """Every Ray pod and the CronJob that submits to the cluster run the image the
    Dockerfile's default build produces (the client's Ray must match the cluster's)."""
    images = set()
    for kind in ("RayCluster", "RayJob", "CronJob"):
        imgs = {c["image"] for c in containers(one(kind))}
        assert imgs, f"{kind} has no containers"
        images |= imgs
    assert len(images) == 1, images
    assert dockerfile_built_images()["default"] == images.pop()
    mlflow_image = {c["image"] for c in containers(one("Deployment"))}
    assert mlflow_image == {dockerfile_built_images()["mlflow"]}


def project() -> dict:
    """pyproject.toml's [project] table."""
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def locked_versions() -> dict[str, str]:
    """name -> version of every pin in requirements.lock (what `make install` and the image install)."""
    pins = re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", (REPO / "requirements.lock").read_text(), re.M)
    return {name.lower(): version for name, version in pins}


def test_ray_version_pins_agree_with_the_lock():
    """Dockerfile, KubeRay rayVersion and the launcher's pip pin name the lock's Ray version, and
    pyproject's range admits it; a Ray client only talks to a cluster of its own version."""
    from packaging.requirements import Requirement

    ray_version = locked_versions()["ray"]
    docker = re.search(r"^ARG RAY_VERSION=(\S+)$", (INFRA / "Dockerfile").read_text(), re.M).group(1)
    pins = {docker, one("RayCluster")["spec"]["rayVersion"], one("RayJob")["spec"]["rayClusterSpec"]["rayVersion"],
            one("RayService")["spec"]["rayClusterConfig"]["rayVersion"]}
    launcher = re.findall(r'ray\[[a-z,]+\]==([0-9.]+)', " ".join(ray_cluster_config()["setup_commands"]))
    assert launcher and pins | set(launcher) == {ray_version}
    deps = [Requirement(d) for d in project()["dependencies"]]
    assert ray_version in next(r for r in deps if r.name == "ray").specifier


def test_lock_pins_every_dependency_within_pyproject_ranges():
    """requirements.lock holds each dependency (dev extra too) at a version pyproject.toml allows,
    and the MLflow server image runs the lock's MLflow."""
    from packaging.requirements import Requirement

    locked = locked_versions()
    for dep in project()["dependencies"] + project()["optional-dependencies"]["dev"]:
        req = Requirement(dep)
        assert req.name.lower() in locked, f"{req.name} is not in requirements.lock (run `make lock`)"
        assert locked[req.name.lower()] in req.specifier, f"lock has {req.name}=={locked[req.name.lower()]}, " \
            f"pyproject wants {req.specifier} (run `make lock`)"
    mlflow_image = re.search(r"^ARG MLFLOW_VERSION=(\S+)$", (INFRA / "Dockerfile").read_text(), re.M).group(1)
    assert mlflow_image == locked["mlflow"]


def test_dockerfile_installs_the_package_with_gpu_extra():
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-gpu", text, re.M)
    assert re.search(r"^COPY --chown=ray:users \. /home/ray/sscq-dist$", text, re.M)
    assert re.search(r'pip install --no-cache-dir -r requirements\.lock "\.\[gpu\]"', text)
    assert "import ray, sscq_dist" in text, "build must fail when the package does not import"
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", ".cluster", "data"} <= set(ignore)


# --- commands ----------------------------------------------------------------------------


def test_rayjob_runs_train_with_a_loadable_config():
    """The RayJob entrypoint is `python jobs/train.py --config configs/<x>.yaml k=v ...`,
    that config loads with those overrides, and it asks for one GPU worker per GPU pod."""
    from sscq_dist.config import load_config

    job = one("RayJob")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:3] == ["python", "jobs/train.py", "--config"]
    cfg_path, overrides = config_and_overrides(argv)
    assert re.fullmatch(r"configs/[\w-]+\.yaml", cfg_path) and (REPO / cfg_path).exists()
    cfg = load_config(REPO / cfg_path, overrides)
    gpu_groups = [g for g in job["rayClusterSpec"]["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c["resources"]["limits"] for c in containers(g))]
    assert len(gpu_groups) == 1
    assert cfg.train.use_gpu and cfg.train.num_workers == gpu_groups[0]["replicas"]
    assert cfg.train.storage_path.startswith("s3://"), "checkpoints must outlive the job's cluster"
    assert yaml.safe_load(job["runtimeEnvYAML"])["working_dir"] == "/home/ray/sscq-dist"
    assert job["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert job["shutdownAfterJobFinishes"] is True


def test_cronjob_submits_reindex_to_the_shared_cluster():
    """Valid 5-field schedule, no overlapping runs, and `ray job submit --address
    http://<RayCluster>-head-svc:8265 --working-dir ... -- python jobs/reindex.py ...`."""
    from sscq_dist.config import load_config

    cron = one("CronJob")["spec"]
    assert valid_cron(cron["schedule"])
    assert cron["concurrencyPolicy"] == "Forbid"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    argv = container["command"]
    head_svc = f"http://{one('RayCluster')['metadata']['name']}-head-svc:8265"
    assert argv[:5] == ["ray", "job", "submit", "--address", head_svc]
    assert argv[argv.index("--working-dir") + 1] == container["workingDir"]
    job = argv[argv.index("--") + 1:]
    assert job[:2] == ["python", "jobs/reindex.py"]
    for flag in ("--images", "--index-root"):
        assert job[job.index(flag) + 1].startswith("s3://")
    assert job[job.index("--model") + 1] == "models:/sscq@champion"
    cfg_path, overrides = config_and_overrides(job)
    cfg = load_config(REPO / cfg_path, overrides)
    # The nightly build runs its part builders on the cluster's GPU worker group.
    assert cfg.index.use_gpu
    gpu_groups = [g for g in one("RayCluster")["spec"]["workerGroupSpecs"]
                  if "nvidia.com/gpu" in str(g["template"]["spec"]["containers"][0].get("resources", {}))]
    assert gpu_groups, "index.use_gpu=true needs a GPU worker group in the RayCluster"


def test_crontab_example_is_a_valid_non_overlapping_reindex():
    lines = [ln for ln in (INFRA / "cron" / "reindex.crontab").read_text().splitlines()
             if ln.strip() and not ln.startswith("#") and not re.match(r"^\w+=", ln)]
    assert len(lines) == 1
    fields = lines[0].split(None, 5)
    assert valid_cron(" ".join(fields[:5]))
    command = fields[5]
    assert "flock -n" in command and "ray job submit" in command
    assert "python jobs/reindex.py --config configs/" in command
    assert "index.use_gpu=true" in command.split()
    assert "%" not in command, "cron turns % into newlines"


def test_cron_validator_rejects_bad_schedules():
    assert valid_cron("0 2 * * *") and valid_cron("*/15 0-6 1,15 * 1-5")
    for bad in ("0 2 * *", "60 2 * * *", "0 24 * * *", "0 2 0 * *", "*/0 * * * *", "0 2 * * mon-"):
        assert not valid_cron(bad), bad


@pytest.mark.parametrize("entry", ["jobs/train.py", "jobs/reindex.py"])
def test_job_entrypoints_exist(entry):
    """The files the manifests run exist and take the flags the manifests pass."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(REPO / entry), "--help"], capture_output=True, text=True,
                         timeout=120, cwd=str(REPO))
    assert out.returncode == 0, out.stderr
    assert "--config" in out.stdout and "--verbose" in out.stdout


# --- configuration and credentials ---------------------------------------------------------


def test_env_names_are_ones_the_code_reads():
    for path, docs in manifests().items():
        for doc in docs:
            names = {e["name"] for e in env_entries(doc)}
            assert names <= ALLOWED_ENV, f"{path}: unexpected env {names - ALLOWED_ENV}"
            if doc["kind"] == "ConfigMap":
                assert set(doc["data"]) <= ALLOWED_ENV - SECRET_ENV, f"{path}: {set(doc['data'])}"


def test_credentials_only_by_secret_reference():
    """Credential env vars come from secretKeyRef, never a literal value; no key material,
    and Secret objects appear only in the example file, with placeholder values."""
    for path, docs in manifests().items():
        text = (REPO / path).read_text()
        assert not AWS_KEY_ID_RE.search(text), f"{path} contains an AWS access key id"
        for doc in docs:
            for e in env_entries(doc):
                if e["name"] in SECRET_ENV:
                    assert "value" not in e, f"{path}: literal value for {e['name']}"
                    assert e["valueFrom"]["secretKeyRef"]["name"], f"{path}: {e['name']} not from a Secret"
            if doc["kind"] == "Secret":
                assert path == "infra/k8s/secrets.example.yaml", f"{path} defines a Secret"
                assert "data" not in doc, "example Secrets use readable stringData placeholders"
                for key, value in doc["stringData"].items():
                    assert "<" in value and ">" in value, f"{doc['metadata']['name']}/{key} is not a placeholder"


def test_referenced_secrets_configmaps_and_service_accounts_are_defined():
    """Every secretKeyRef (name, key) is documented in secrets.example.yaml; every
    configMapRef and serviceAccountName is defined in infra/k8s/config.yaml."""
    secrets = {(s["metadata"]["name"], k) for s in find_kind("Secret") for k in s["stringData"]}
    configmaps = {c["metadata"]["name"] for c in find_kind("ConfigMap")}
    accounts = {a["metadata"]["name"] for a in find_kind("ServiceAccount")}
    used_secrets, used_cms, used_sas = set(), set(), set()
    for docs in manifests().values():
        for doc in docs:
            for d in walk(doc):
                if "secretKeyRef" in d:
                    used_secrets.add((d["secretKeyRef"]["name"], d["secretKeyRef"]["key"]))
                if "configMapRef" in d:
                    used_cms.add(d["configMapRef"]["name"])
                if "serviceAccountName" in d:
                    used_sas.add(d["serviceAccountName"])
    assert used_secrets and used_secrets <= secrets, used_secrets - secrets
    assert used_cms <= configmaps, used_cms - configmaps
    assert used_sas <= accounts, used_sas - accounts


def test_shared_raycluster_requires_the_token_everywhere():
    """Head, every worker group and the autoscaler run with RAY_AUTH_MODE=token and the
    same token Secret the CronJob submits with."""
    rc = one("RayCluster")["spec"]
    groups = [rc["headGroupSpec"]] + rc["workerGroupSpecs"]
    token_refs = set()
    for envs in [c.get("env", []) for g in groups for c in containers(g)] + [rc["autoscalerOptions"]["env"]]:
        by_name = {e["name"]: e for e in envs}
        assert by_name["RAY_AUTH_MODE"]["value"] == "token"
        ref = by_name["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        token_refs.add((ref["name"], ref["key"]))
    (cron_container,) = containers(one("CronJob"))
    cron_ref = {e["name"]: e for e in cron_container["env"]}["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token_refs == {(cron_ref["name"], cron_ref["key"])}


def test_mlflow_deployment_postgres_store_and_s3_artifacts():
    """Backend store DSN from the Secret (never in args), artifacts to S3, /health probes,
    and a Service that selects the pods and targets the container's port."""
    dep = one("Deployment")
    (c,) = containers(dep)
    args = c["args"]
    assert args[args.index("--artifacts-destination") + 1].startswith("s3://")
    assert "--backend-store-uri" not in args and not any("postgresql" in a for a in args)
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    (svc,) = [d for d in find_kind("Service") if d["metadata"]["name"] == "sscq-mlflow"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port_names = {p["name"] for p in c["ports"]}
    assert all(p["targetPort"] in port_names for p in svc["spec"]["ports"])
    # Clients in the cluster use the Service name, which the server must accept as Host.
    tracking = one("ConfigMap")["data"]["MLFLOW_TRACKING_URI"]
    assert tracking == f"http://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    assert svc["metadata"]["name"] in args[args.index("--allowed-hosts") + 1].split(",")


# --- the search service (Ray Serve) ----------------------------------------------------------


def serve_apps() -> dict[str, dict]:
    """The Serve application of configs/serve.yaml and of the RayService's serveConfigV2."""
    local = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    k8s = yaml.safe_load(one("RayService")["spec"]["serveConfigV2"])
    return {"configs/serve.yaml": local, "infra/kuberay/rayservice-search.yaml": k8s}


def test_serve_configs_pass_serves_schema_and_build_our_app(monkeypatch):
    """Both Serve configs validate against Serve's own schema, name our application builder,
    carry args that load as our config, one user_config of run-time keys per deployment that
    exists (SearchIngress, Partition0..N-1), and the builder binds the app from those args.
    serve.host names the proxy's bind, so the builder's token rule sees the real host."""
    from ray.serve.schema import ServeDeploySchema

    monkeypatch.setenv("SSCQ_SERVE_TOKEN", "infra-test-token-0123456789")

    from sscq_dist.config import load_config
    from sscq_dist.serving.app import INGRESS_NAME, RUNTIME_FIELDS, apply_runtime, build_app, partition_name

    for where, conf in serve_apps().items():
        ServeDeploySchema(**conf)
        (app,) = conf["applications"]
        assert app["import_path"] == "sscq_dist.serving.app:build_app", where
        args = dict(app["args"])
        # The image holds the repo at /home/ray/sscq-dist (infra/Dockerfile): map that to this checkout.
        args["config"] = str(REPO / args["config"].removeprefix("/home/ray/sscq-dist/"))
        assert os.path.exists(args["config"]), (where, args["config"])
        cfg = load_config(args["config"], args["overrides"])
        names = [d["name"] for d in app["deployments"]]
        assert sorted(names) == sorted([INGRESS_NAME] + [partition_name(i) for i in range(cfg.serve.partitions)]), where
        for d in app["deployments"]:
            assert set(d["user_config"]) == set(RUNTIME_FIELDS), (where, d["name"])
            apply_runtime(cfg.serve, d["user_config"])  # valid values, or a ConfigError naming the key
        assert cfg.serve.host == conf["http_options"]["host"], where
        assert build_app(args) is not None
    k8s = serve_apps()["infra/kuberay/rayservice-search.yaml"]["applications"][0]
    assert k8s["args"]["index_root"].startswith("s3://"), "the cluster serves the index the CronJob publishes"
    assert k8s["args"]["config"].startswith("/home/ray/sscq-dist/configs/")


def test_rayservice_runs_our_image_with_token_auth_and_the_serve_port():
    import ray

    svc = one("RayService")["spec"]
    rc = svc["rayClusterConfig"]
    assert rc["rayVersion"] == ray.__version__
    assert {c["image"] for c in containers(one("RayService"))} == {dockerfile_built_images()["default"]}
    groups = [rc["headGroupSpec"]] + rc["workerGroupSpecs"]
    for envs in [c.get("env", []) for g in groups for c in containers(g)] + [rc["autoscalerOptions"]["env"]]:
        by_name = {e["name"]: e for e in envs}
        assert by_name["RAY_AUTH_MODE"]["value"] == "token"
        assert by_name["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "sscq-ray-auth"
    (head,) = containers(rc["headGroupSpec"])
    port = yaml.safe_load(svc["serveConfigV2"])["http_options"]["port"]
    assert port in {p["containerPort"] for p in head["ports"]}


def test_rayservice_requires_the_serve_token_from_a_mounted_secret():
    """The search app binds every interface, so it reads its token from a file of the Secret
    sscq-serve-token mounted on every pod; without a token the builder refuses to start."""
    from sscq_dist.config import load_config
    from sscq_dist.errors import SSCQError
    from sscq_dist.serving.app import build_app

    svc = one("RayService")
    (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    args = dict(app["args"], config=str(REPO / app["args"]["config"].removeprefix("/home/ray/sscq-dist/")))
    cfg = load_config(args["config"], args["overrides"])
    assert cfg.serve.host == "0.0.0.0" and not cfg.serve.insecure_no_auth
    groups = [svc["spec"]["rayClusterConfig"]["headGroupSpec"]] + svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    for g in groups:
        vols = {v["name"]: v for v in g["template"]["spec"]["volumes"]}
        for c in containers(g):
            (mount,) = [m for m in c["volumeMounts"] if vols[m["name"]].get("secret", {}).get("secretName") ==
                        "sscq-serve-token"]
            assert mount["readOnly"] and os.path.dirname(cfg.serve.token_file) == mount["mountPath"]
    secrets = {(d["metadata"]["name"], k) for d in find_kind("Secret") for k in d["stringData"]}
    assert ("sscq-serve-token", os.path.basename(cfg.serve.token_file)) in secrets
    with pytest.raises(SSCQError, match="cannot read"):  # no mounted file here: refused, never served open
        build_app(args)


def test_search_metrics_are_scraped_with_the_token_and_charted():
    """A ServiceMonitor scrapes /metrics on the serve port with the token Secret; the pods carry
    the scrape annotations; every metric the Grafana dashboard queries is one the service exports."""
    import json

    from sscq_dist.serving import metrics

    (mon,) = find_kind("ServiceMonitor")
    (ep,) = mon["spec"]["endpoints"]
    assert ep["path"] == "/metrics" and ep["authorization"]["credentials"]["name"] == "sscq-serve-token"
    svc = [d for d in find_kind("Service") if d["metadata"]["labels"].items() >= mon["spec"]["selector"]["matchLabels"].items()]
    assert len(svc) == 1 and ep["port"] in {p["name"] for p in svc[0]["spec"]["ports"]}
    head = one("RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]
    assert head["labels"].items() >= svc[0]["spec"]["selector"].items()
    assert head["annotations"]["prometheus.io/scrape"] == "true" and head["annotations"]["prometheus.io/path"] == "/metrics"
    dash = json.loads((REPO / "infra" / "grafana" / "sscq-search-dashboard.json").read_text())
    exported = {m.name for m in metrics.REGISTRY.collect()}
    used = {n for p in dash["panels"] for t in p["targets"] for n in re.findall(r"\b(sscq_[a-z_]+)", t["expr"])}
    base = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in used}
    assert len(dash["panels"]) >= 8 and base <= exported, base - exported
