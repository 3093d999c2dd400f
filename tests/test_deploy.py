"""The deployment files (docker/): they parse, copy what exists, and start the launcher with arguments it takes.

Nothing here builds an image or talks to a cluster; it reads the files as Docker, Compose and Kubernetes would.
"""

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

from flover_backend.cli import build_parser
from flover_backend.config import EngineConfig
from flover_backend.frontends.triton.metrics import HISTOGRAM, METRICS
from flover_backend.server.serve import run_serve

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = ("Dockerfile", "Dockerfile.cpu")
LAUNCHER = ["python3", "-m", "flover_backend", "serve", "--host", "0.0.0.0", "--openai-port", "8003"]
NGC_ENTRYPOINT = "/opt/nvidia/nvidia_entrypoint.sh"  # the NGC image's own wrapper; it ends in `exec "$@"`
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002, "openai": 8003}
MONITORING = {"prometheus": 9090, "grafana": 3000}  # the `monitoring` profile's services and their ports


def instructions(name: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per Dockerfile instruction: comments dropped, `\\` continuations joined."""
    result, pending = [], ""
    for line in (DOCKER / name).read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        result.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, f"{name} ends inside a continued line"
    return result


def only(name: str, keyword: str) -> str:
    """The arguments of the one `keyword` instruction of the Dockerfile."""
    found = [rest for key, rest in instructions(name) if key == keyword]
    assert len(found) == 1, f"{name}: expected one {keyword}, found {len(found)}"
    return found[0]


def exec_form(name: str, keyword: str) -> list[str]:
    """ENTRYPOINT or CMD as its JSON array: shell form would put `sh` between `docker stop` and the launcher."""
    value = json.loads(only(name, keyword))
    assert isinstance(value, list) and all(isinstance(item, str) for item in value)
    return value


def env(name: str) -> dict[str, str]:
    """The Dockerfile's ENV settings (KEY=VALUE form)."""
    pairs = [item for key, rest in instructions(name) if key == "ENV" for item in shlex.split(rest)]
    return dict(pair.split("=", 1) for pair in pairs)


def launcher_args(name: str, args: list[str]) -> list[str]:
    """The `flover` arguments the container runs: the entrypoint past the launcher's module, then `args`."""
    entrypoint = exec_form(name, "ENTRYPOINT")
    if name == "Dockerfile":
        assert entrypoint[0] == NGC_ENTRYPOINT
        entrypoint = entrypoint[1:]
    assert entrypoint == LAUNCHER
    return entrypoint[3:] + args


def check_serve_args(argv: list[str]):
    """Parse `argv` as the launcher would and check what it serves; return the namespace."""
    args = build_parser().parse_args(argv)
    assert args.run is run_serve
    assert (args.http_port, args.grpc_port, args.metrics_port, args.openai_port) == tuple(PORTS.values())
    for model in args.models or []:
        assert (ROOT / "model_repository" / model / "config.pbtxt").is_file(), model
    settings = dict(item.split("=", 1) for item in args.set)
    EngineConfig.from_dict(settings)  # unknown keys and bad values raise, as they would in the model
    return args


def compose_defaults(text: str) -> str:
    """Replace Compose's `${VAR:-default}` with its default, as an unset environment would."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict]:
    documents = [doc for doc in yaml.safe_load_all((DOCKER / "k8s" / "flover.yaml").read_text()) if doc]
    return {doc["kind"]: doc for doc in documents}


def flover_container(pod_spec: dict) -> dict:
    """The pod's flover container (beside it runs the edge proxy)."""
    (container,) = [c for c in pod_spec["containers"] if c["name"] == "flover"]
    return container


def edge_routes() -> dict[int, tuple[str, int]]:
    """docker/nginx.conf's routes: listen port -> (upstream host, port); each upstream must cap its connections."""
    text = (DOCKER / "nginx.conf").read_text()
    upstreams = {}
    for name, host, port, max_conns in re.findall(r"upstream (\w+) \{ server ([\w.-]+):(\d+) max_conns=(\d+); \}", text):
        assert 0 < int(max_conns) <= 4096, f"{name}: max_conns {max_conns}"
        upstreams[name] = (host, int(port))
    return {int(port): upstreams[name] for port, name in re.findall(r"listen (\d+); proxy_pass (\w+);", text)}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_name(spec: str) -> str:
    return re.match(r"[A-Za-z0-9_.\-]+", spec).group(0).lower()


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copy_sources_exist_in_the_build_context(name):
    copies = [shlex.split(rest) for key, rest in instructions(name) if key in ("COPY", "ADD")]
    assert copies
    for words in copies:
        assert not any(word.startswith("--from") for word in words), "no other stages"
        sources = [word for word in words if not word.startswith("--")][:-1]
        for source in sources:
            assert list(ROOT.glob(source.rstrip("/"))), f"{name}: COPY {source} is not in the repository"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_editable_install_has_what_it_needs_copied_first(name):
    needed = {"pyproject.toml", pyproject()["project"]["readme"], "flover_backend"}
    copied = set()
    for key, rest in instructions(name):
        if key == "COPY":
            copied |= {Path(word).as_posix() for word in shlex.split(rest)[:-1]}
        if key == "RUN" and re.search(r"pip install .*-e ", rest):
            assert needed <= copied, f"{name}: {needed - copied} not copied before the install"
            break
    else:
        pytest.fail(f"{name} has no editable install (the launcher finds model_repository/ beside the package)")
    assert any(key == "COPY" and "model_repository" in rest for key, rest in instructions(name))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_entrypoint_is_the_launcher_and_cmd_parses(name):
    assert importlib.util.find_spec("flover_backend.__main__") is not None  # `python3 -m flover_backend`
    args = check_serve_args(launcher_args(name, exec_form(name, "CMD")))
    assert args.host == "0.0.0.0"
    if name == "Dockerfile":
        assert "device=cuda" in args.set


@pytest.mark.parametrize("name", DOCKERFILES)
def test_ports_healthcheck_and_flover_home(name):
    assert sorted(map(int, only(name, "EXPOSE").split())) == sorted(PORTS.values())
    healthcheck = only(name, "HEALTHCHECK")
    assert f"127.0.0.1:{PORTS['http']}/v2/health/ready" in healthcheck
    assert json.loads(healthcheck[healthcheck.index("CMD") + 3:])[0] == "python3"  # both images have it
    assert json.loads(only(name, "VOLUME")) == [env(name)["FLOVER_HOME"]]


def test_gpu_image_installs_every_runtime_dependency():
    """The GPU image installs the package with --no-deps, so its explicit list must keep up with pyproject."""
    project = pyproject()["project"]
    extras = project["optional-dependencies"]
    # `serve` less the wheel that carries a tritonserver: the image has its own (the front needs the rest).
    serve = [spec for spec in extras["serve"] if requirement_name(spec) != "nvidia-pytriton"]
    wanted = {requirement_name(spec) for spec in project["dependencies"] + extras["gpu"] + serve}
    runs = " ".join(rest for key, rest in instructions("Dockerfile") if key == "RUN")
    installed = {requirement_name(word) for word in shlex.split(runs) if re.match(r"[A-Za-z]", word)}
    torch_arg = [rest for key, rest in instructions("Dockerfile") if key == "ARG" and rest.startswith("TORCH_SPEC=")]
    assert torch_arg and '"${TORCH_SPEC}"' in runs
    assert wanted - {"torch"} <= installed, f"missing from docker/Dockerfile: {wanted - {'torch'} - installed}"
    assert re.search(r"pip install --no-deps -e \.", runs)


def test_cpu_image_torch_matches_the_pin():
    """A different version would make `pip install -e .` swap the CPU torch for PyPI's CUDA wheel."""
    pin = next(spec for spec in pyproject()["project"]["dependencies"] if requirement_name(spec) == "torch")
    args = dict(rest.split("=", 1) for key, rest in instructions("Dockerfile.cpu") if key == "ARG")
    assert pin.replace(" ", "") == f"torch=={args['TORCH_VERSION']}"
    assert 'pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"' in " ".join(
        rest for key, rest in instructions("Dockerfile.cpu") if key == "RUN")


def test_compose_gpu_service(compose):
    service = compose["services"]["flover"]
    context = (DOCKER / service["build"]["context"]).resolve()
    assert context == ROOT and (context / service["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]} in devices
    check_serve_args(launcher_args("Dockerfile", [compose_defaults(arg) for arg in service["command"]]))


@pytest.mark.parametrize(("service_name", "dockerfile"), [("flover", "Dockerfile"), ("flover-cpu", "Dockerfile.cpu")])
def test_compose_ports_health_and_volumes(compose, service_name, dockerfile):
    service = compose["services"][service_name]
    assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DOCKER / dockerfile
    published = sorted(compose_defaults(port) for port in service["ports"])
    assert published == sorted(f"127.0.0.1:{port}:{port}" for port in PORTS.values()), "loopback by default"
    assert any(f"127.0.0.1:{PORTS['http']}/v2/health/ready" in word for word in service["healthcheck"]["test"])
    mounts = dict(reversed(compose_defaults(volume).split(":")[:2]) for volume in service["volumes"])
    assert "/models" in mounts
    home = mounts[env(dockerfile)["FLOVER_HOME"]]
    assert home in compose["volumes"], "FLOVER_HOME must be a named volume"
    assert int(service["shm_size"].rstrip("gbm")) >= 1
    check_serve_args(launcher_args(dockerfile, [compose_defaults(arg) for arg in service["command"]]))


def test_compose_cpu_service_is_behind_a_profile(compose):
    assert compose["services"]["flover-cpu"]["profiles"] == ["cpu"]
    assert "profiles" not in compose["services"]["flover"]


def test_compose_monitoring_profile_stays_on_loopback_and_mounts_what_exists(compose):
    for name, port in MONITORING.items():
        service = compose["services"][name]
        assert service["profiles"] == ["monitoring"]
        assert [compose_defaults(published) for published in service["ports"]] == [f"127.0.0.1:{port}:{port}"]
        for volume in service["volumes"]:
            source = volume.split(":")[0]
            assert not source.startswith(".") or (DOCKER / source).exists(), f"{name} mounts missing {source}"
            assert source.startswith(".") or source in compose["volumes"], f"{name}: {source} must be a named volume"


def mounted(compose, service: str, source: str) -> str:
    """Where `service` mounts the file or folder `source` (relative to docker/)."""
    (target,) = [volume.split(":")[1] for volume in compose["services"][service]["volumes"]
                 if volume.split(":")[0] == source]
    return target


def test_prometheus_scrapes_the_metrics_port_of_either_flover_service(compose):
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    assert mounted(compose, "prometheus", "./prometheus.yml") == "/etc/prometheus/prometheus.yml"
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    targets = {target for group in job["static_configs"] for target in group["targets"]}
    assert targets == {f"{name}:{PORTS['metrics']}" for name in ("flover", "flover-cpu")}
    assert targets <= {f"{name}:{PORTS['metrics']}" for name in compose["services"]}


def dashboard() -> dict:
    return json.loads((DOCKER / "grafana" / "dashboards" / "flover.json").read_text())


def test_grafana_provisions_prometheus_and_the_dashboard(compose):
    provisioning = DOCKER / "grafana" / "provisioning"
    assert mounted(compose, "grafana", "./grafana/provisioning") == "/etc/grafana/provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == f"http://prometheus:{MONITORING['prometheus']}"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "flover.yaml").read_text())["providers"]
    assert mounted(compose, "grafana", "./grafana/dashboards") == provider["options"]["path"]
    board = dashboard()
    used = [panel["datasource"] for panel in board["panels"]] + [
        target["datasource"] for panel in board["panels"] for target in panel["targets"]]
    assert all(datasource == {"type": "prometheus", "uid": source["uid"]} for datasource in used)


def test_dashboard_queries_only_metrics_the_server_exports():
    board = dashboard()
    queries = [target["expr"] for panel in board["panels"] for target in panel["targets"]]
    queries += [variable["definition"] for variable in board["templating"]["list"]]
    kinds = {spec.name: spec.kind for spec in METRICS}
    queried = set()
    for name in {name for query in queries for name in re.findall(r"\bflover_\w+", query)}:
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert family in kinds, f"the dashboard queries {name}, which the server does not export"
        assert (family != name) == (kinds[family] == HISTOGRAM), f"{name}: a histogram's series, and only those"
        queried.add(family)
    wanted = {"flover_generated_tokens_total", "flover_time_to_first_token_seconds",
              "flover_time_per_output_token_seconds", "flover_requests_running", "flover_requests_waiting",
              "flover_iteration_seconds", "flover_compaction_bytes_total", "flover_compaction_seconds",
              "flover_prefix_cache_queries_total", "flover_prefix_cache_hits_total", "flover_prefix_cache_retained_rows"}
    assert wanted <= queried, f"panels missing: {wanted - queried}"
    assert all("histogram_quantile" in query for query in queries if "_bucket" in query)


def test_k8s_deployment(k8s):
    deployment = k8s["Deployment"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    container = flover_container(pod["spec"])
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == PORTS
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1

    def probe(kind: str) -> tuple[str, int]:
        get = container[kind]["httpGet"]
        return get["path"], ports.get(get["port"], get["port"])  # a named port resolves to its number

    assert probe("readinessProbe") == ("/v2/models/flover/ready", PORTS["http"])
    assert probe("livenessProbe") == ("/v2/health/live", PORTS["http"])

    annotations = pod["metadata"]["annotations"]
    assert all(isinstance(value, str) for value in annotations.values()), "annotations must be strings"
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(PORTS["metrics"])
    assert annotations["prometheus.io/path"] == "/metrics"


def test_k8s_args_volumes_and_model_path(k8s):
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    container = flover_container(pod)
    args = check_serve_args(launcher_args("Dockerfile", container["args"]))
    assert "device=cuda" in args.set
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    claims = [volume["name"] for volume in pod["volumes"] if "persistentVolumeClaim" in volume]
    assert len(claims) == 1 and claims[0] in mounts
    model = dict(item.split("=", 1) for item in args.set)["model"]
    assert Path(model).is_relative_to(mounts[claims[0]]), "the checkpoint must be on the mounted claim"
    assert env("Dockerfile")["FLOVER_HOME"] in mounts.values()


def test_k8s_service_reaches_the_pods(k8s):
    pod = k8s["Deployment"]["spec"]["template"]
    service = k8s["Service"]["spec"]
    assert service["type"] == "ClusterIP"
    assert service["selector"] and service["selector"].items() <= pod["metadata"]["labels"].items()
    container_ports = {port["name"]: port["containerPort"] for c in pod["spec"]["containers"] for port in c["ports"]}
    routes = edge_routes()
    for port in service["ports"]:
        assert port["port"] == PORTS[port["name"]]
        target = container_ports[port["targetPort"]]
        if port["name"] == "metrics":  # scraped straight from tritonserver
            assert target == PORTS["metrics"]
        else:  # through the edge proxy, which caps the connections, to the same port of flover
            assert routes[target] == ("flover-server", PORTS[port["name"]])


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_run_as_a_user_that_owns_only_flover_home(name):
    users = [rest for key, rest in instructions(name) if key == "USER"]
    assert users and users[-1] not in ("root", "0"), "the last USER must not be root"
    (created,) = [rest for key, rest in instructions(name) if key == "RUN" and "useradd" in rest]
    assert f"--uid {users[-1]}" in created and f"chown flover {env(name)['FLOVER_HOME']}" in created


def test_k8s_runs_unprivileged_with_the_admin_key_from_a_secret_and_a_network_policy(k8s):
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    container = flover_container(pod)
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    (key,) = [item for item in container["env"] if item["name"] == "FLOVER_ADMIN_KEY"]
    assert key["valueFrom"]["secretKeyRef"]["optional"] is True
    policy = k8s["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= k8s["Deployment"]["spec"]["template"]["metadata"][
        "labels"].items()
    allowed = {port["port"] for rule in policy["ingress"] for port in rule["ports"]}
    # Clients reach the edge's ports only (tritonserver's own are shut to them), Prometheus the metrics port.
    assert allowed == set(edge_routes()) | {PORTS["metrics"]} and all(rule["from"] for rule in policy["ingress"])


def test_the_edge_proxy_is_the_same_in_compose_and_kubernetes_and_reaches_flover(compose, k8s):
    config = (DOCKER / "nginx.conf").read_text()
    assert k8s["ConfigMap"]["data"]["nginx.conf"] == config
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    (edge,) = [c for c in pod["containers"] if c["name"] == "edge"]
    (mount,) = edge["volumeMounts"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == k8s["ConfigMap"]["metadata"]["name"]
    assert mount["mountPath"] == "/etc/nginx/nginx.conf" == mounted(compose, "edge", "./nginx.conf")
    assert {"ip": "127.0.0.1", "hostnames": ["flover-server"]} in pod["hostAliases"]
    assert {port["containerPort"] for port in edge["ports"]} == set(edge_routes())
    edge_service = compose["services"]["edge"]
    assert edge_service["profiles"] == ["edge"]
    assert sorted(compose_defaults(port) for port in edge_service["ports"]) == sorted(
        f"127.0.0.1:{port}:{port}" for port in edge_routes()), "loopback by default"
    for name in ("flover", "flover-cpu"):
        service = compose["services"][name]
        assert "flover-server" in service["networks"]["default"]["aliases"]
        assert service["ulimits"]["nofile"] >= 4096 and service["logging"]["options"]["max-size"]
