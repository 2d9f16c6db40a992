"""deploy/ and docker-compose.yml agree with the code: settings, commands, ports, topics, metrics.

No Docker engine is needed: the files are parsed and checked against ``streams.config``,
``streams.tools.cli``, ``streams.kafka.clients`` and ``streams.worker.metrics``. The container health check is run
for real against the worker's metrics server, and where ``promtool`` is installed (``make
test`` installs Debian's ``prometheus``), the scrape config and alert rules are checked and
the rule unit tests (``deploy/prometheus/alerts_test.yml``) run with it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

try:
    import yaml
except ImportError as exc:  # pragma: no cover - a setup problem, said plainly
    raise ImportError(
        "PyYAML is missing: it is in pyproject's test extra; run `make test` or `pip install -e '.[test]'`"
    ) from exc

from streams.config import SETTINGS_DOC, Settings  # noqa: E402
from streams.kafka.clients import required_topics  # noqa: E402
from streams.tools.cli import COMMANDS, parse_args  # noqa: E402
from streams.worker.metrics import METRIC_NAMES, HealthState, MetricsServer, WorkerMetrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "shoppulse.json"
GRAFANA_DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_PROVIDER = DEPLOY / "grafana" / "provisioning" / "dashboards" / "shoppulse.yml"
DOCKERFILES = {"cpu": DEPLOY / "Dockerfile", "cuda": DEPLOY / "Dockerfile.cuda"}
DOCS = ROOT / "docs" / "deploy.md"

# Metric families the rules and the dashboard use before the worker exports them. The rules
# test fails for any name that is neither in streams.worker.metrics.METRIC_NAMES nor listed here;
# once the worker exports one, it belongs in METRIC_NAMES and can leave this list.
PLANNED_METRICS: tuple[str, ...] = ()
#: Prometheus' own series the rules may use.
PROMETHEUS_METRICS = ("up",)
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count", "_created")

#: Variables docker-compose.yml interpolates that are not ShopPulse settings; docs/deploy.md
#: documents each of them.
COMPOSE_VARIABLES = (
    "KAFKA_HOST_PORT",
    "KAFKA_CLUSTER_ID",
    "PROMETHEUS_HOST_PORT",
    "PROMETHEUS_RETENTION",
    "GRAFANA_HOST_PORT",
    "GRAFANA_ADMIN_PASSWORD",
    "SHOPPULSE_MODELS_HOST_DIR",
)
#: Services that run the `shoppulse` command from our image.
SHOPPULSE_SERVICES = ("worker", "generator", "archive", "retrain")
SETTING_VARS = {var for var, _, _ in SETTINGS_DOC.values()}
DEFAULTS = {name: default for name, (_, default, _) in SETTINGS_DOC.items()}


# --------------------------------------------------------------------------- helpers


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


_VAR = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(text, environ: dict[str, str] | None = None):
    """Compose's variable interpolation: ``$$`` is a literal ``$``, ``${VAR:-default}`` etc."""
    if not isinstance(text, str):
        return text
    env = environ or {}
    parts = text.split("$$")

    def sub(match: re.Match) -> str:
        name = match.group("braced") or match.group("bare")
        value = env.get(name)
        if match.group("op") == ":-" and not value:
            return match.group("default")
        if match.group("op") == "-" and value is None:
            return match.group("default")
        return value or ""

    return "$".join(_VAR.sub(sub, part) for part in parts)


def compose_variables(text: str) -> set[str]:
    """Names of the variables docker-compose.yml interpolates (``$$`` escapes excluded)."""
    return {m.group("braced") or m.group("bare") for part in text.split("$$") for m in _VAR.finditer(part)}


def env_of(service: dict, environ: dict[str, str] | None = None) -> dict[str, str]:
    """A service's environment as the container sees it, with compose defaults applied."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(interpolate(value, environ)) for key, value in env.items()}


def command_of(service: dict) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"use the exec (JSON) form, not {args!r}"
    return value


def healthcheck_command(instructions: list[tuple[str, str]]) -> list[str]:
    (args,) = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    _, _, cmd = args.partition(" CMD ")
    return exec_form(cmd.strip())


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.$:])([A-Za-z_:][A-Za-z0-9_:]*)(?![\w:]|\s*\()")
_PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "atan2",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (label matchers, ranges and functions removed)."""
    text = _STRING.sub(" ", expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    return {name for name in _IDENT.findall(text) if name.lower() not in _PROMQL_WORDS}


def family(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in METRIC_NAMES + PLANNED_METRICS:
            return name[: -len(suffix)]
    return name


def alert_rules() -> list[dict]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def dashboard_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


# --------------------------------------------------------------------------- helpers' own tests


def test_promql_metric_names_finds_selectors_only():
    expr = (
        "histogram_quantile(0.99, sum by (le) (rate(shoppulse_end_to_end_latency_seconds_bucket"
        '{job="w", instance=~"$instance"}[$__rate_interval]))) > 1 and on (instance) up == 1e-9 '
        "unless count by (model, version) (shoppulse_model_info offset 5m)"
    )
    assert promql_metric_names(expr) == {"shoppulse_end_to_end_latency_seconds_bucket", "up", "shoppulse_model_info"}


def test_interpolate_follows_compose_rules():
    assert interpolate("${A:-8}") == "8"
    assert interpolate("${A:-8}", {"A": "3"}) == "3"
    assert interpolate("$$X and ${A-}") == "$X and "
    assert compose_variables("$$X ${A:-1} $B") == {"A", "B"}


# --------------------------------------------------------------------------- compose


def test_compose_has_the_stack(services):
    assert {"kafka", "topic-setup", "worker", "generator", "prometheus", "grafana"} <= set(services)


def test_images_are_pinned(services):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for name, service in services.items():
        image = service.get("image")
        assert image, f"service {name} names no image"
        repo, _, tag = image.rpartition(":")
        assert repo and tag and "/" not in tag, f"service {name}: image {image} has no version tag"
        assert tag != "latest", f"service {name}: pin a version instead of {image}"
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    for name in SHOPPULSE_SERVICES:
        assert services[name]["image"] == f"shoppulse:{pyproject['project']['version']}", (
            f"{name}: tag our image with the project version"
        )
    for path in DOCKERFILES.values():
        for keyword, args in parse_dockerfile(path):
            if keyword == "FROM":
                image = args.split()[0]
                assert ":" in image and not image.endswith(":latest"), f"{path.name}: pin {image}"


def test_shoppulse_services_set_only_real_settings(services):
    for name in SHOPPULSE_SERVICES + ("topic-setup",):
        env = env_of(services[name])
        unknown = sorted(set(env) - SETTING_VARS)
        assert not unknown, f"{name} sets {unknown}, which streams.config.SETTINGS_DOC does not know"
        Settings.from_env(env)  # and the values are valid


def test_other_services_set_only_their_own_variables(services):
    kafka_env = env_of(services["kafka"])
    assert all(k.startswith("KAFKA_") or k == "CLUSTER_ID" for k in kafka_env), sorted(kafka_env)
    assert all(k.startswith("GF_") for k in env_of(services["grafana"])), sorted(env_of(services["grafana"]))


def test_compose_variables_are_settings_or_documented():
    text = COMPOSE_FILE.read_text()
    docs = DOCS.read_text()
    used = compose_variables(text)
    unknown = sorted(used - SETTING_VARS - set(COMPOSE_VARIABLES))
    assert not unknown, f"docker-compose.yml interpolates {unknown}: add them to COMPOSE_VARIABLES and docs/deploy.md"
    undocumented = sorted(v for v in used if f"`{v}`" not in docs)
    assert not undocumented, f"docs/deploy.md does not document {undocumented}"


def test_commands_are_shoppulse_subcommands(services):
    subcommands = set(COMMANDS)
    for name in SHOPPULSE_SERVICES:
        argv = command_of(services[name])
        assert argv[0] in subcommands, f"{name} runs `shoppulse {argv[0]}`, not a subcommand ({sorted(subcommands)})"
        try:
            args = parse_args(argv)
        except SystemExit:
            pytest.fail(f"`shoppulse {' '.join(argv)}` ({name}) does not parse")
        assert args.command == argv[0]
    assert command_of(services["worker"]) == ["worker"]
    gen = parse_args(command_of(services["generator"]))
    assert (gen.command, gen.count, gen.rate, gen.clock) == ("generate", 0, 500.0, "live")
    assert services["generator"].get("profiles") == ["generator"]


def test_worker_scales(services):
    worker = services["worker"]
    assert "container_name" not in worker, "a fixed container name stops `--scale worker=N`"
    assert "ports" not in worker, "a fixed host port stops `--scale worker=N`; Prometheus scrapes inside the network"
    depends = worker["depends_on"]
    assert depends["topic-setup"]["condition"] == "service_completed_successfully"
    assert services["topic-setup"].get("restart") in ("no", None)
    env = env_of(worker)
    assert env["SHOPPULSE_METRICS_HOST"] == "0.0.0.0", "bind the metrics server where Prometheus can reach it"
    assert env["SHOPPULSE_CREATE_TOPICS"] == "false", "topic-setup creates the topics, once, before any worker"
    # Each replica needs its own RocksDB directory: an anonymous volume (a bare container path).
    volumes = [v if isinstance(v, str) else v.get("target") for v in worker.get("volumes", [])]
    assert env["SHOPPULSE_DATA_DIR"] in volumes, f"SHOPPULSE_DATA_DIR={env['SHOPPULSE_DATA_DIR']} is not on a volume"
    assert worker["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile"}


def test_worker_reads_the_model_registry_read_only(services):
    worker = services["worker"]
    models_dir = env_of(worker)["SHOPPULSE_MODELS_DIR"]

    def mounts(environ: dict[str, str] | None = None) -> dict[str, tuple[str, list[str]]]:
        """target -> (host source, options) of the worker's bind mounts, as compose interpolates them."""
        found = {}
        for volume in worker["volumes"]:
            source, *rest = str(interpolate(volume, environ)).split(":")
            if rest:
                found[rest[0]] = (source, rest[1:])
        return found

    assert models_dir in mounts(), f"SHOPPULSE_MODELS_DIR={models_dir} is not mounted into the worker"
    source, options = mounts()[models_dir]
    assert options == ["ro"], "workers only read the registry"
    assert Path(source) == Path(DEFAULTS["models_dir"]), (
        "by default the worker serves the registry `shoppulse train` writes on the host"
    )
    assert mounts({"SHOPPULSE_MODELS_HOST_DIR": "/srv/models"})[models_dir][0] == "/srv/models"
    assert Path(models_dir).is_absolute(), (
        "a relative SHOPPULSE_MODELS_DIR depends on the container's working directory"
    )


def test_worker_healthcheck_matches_the_image_and_works(services):
    compose_check = services["worker"]["healthcheck"]["test"]
    assert compose_check[:3] == ["CMD", "python", "-c"], "the image has python, not curl"
    assert "/healthz" in " ".join(compose_check)
    for path in DOCKERFILES.values():
        assert healthcheck_command(parse_dockerfile(path)) == compose_check[1:], f"{path.name} and compose differ"

    # Run the check itself (with this interpreter for `python`) against the worker's server.
    health = HealthState()
    server = MetricsServer(WorkerMetrics(), health, "127.0.0.1", 0).start()
    try:
        port = server.url.rsplit(":", 1)[1]
        env = {**os.environ, "SHOPPULSE_METRICS_PORT": port}
        argv = [sys.executable, *compose_check[2:]]
        assert subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode == 0
        health.alive = False
        assert subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode != 0
    finally:
        server.stop()


def _listeners(text: str) -> dict[str, tuple[str, int]]:
    out = {}
    for item in text.split(","):
        name, _, rest = item.strip().partition("://")
        host, _, port = rest.rpartition(":")
        out[name] = (host, int(port))
    return out


def test_ports_agree(services):
    kafka_env = env_of(services["kafka"])
    listeners = _listeners(kafka_env["KAFKA_LISTENERS"])
    advertised = _listeners(kafka_env["KAFKA_ADVERTISED_LISTENERS"])
    protocols = dict(item.split(":") for item in kafka_env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listeners) == set(protocols)
    assert set(advertised) <= set(listeners)
    controller = kafka_env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert kafka_env["KAFKA_CONTROLLER_QUORUM_VOTERS"].endswith(f":{listeners[controller][1]}")
    # In-network clients bootstrap through a listener the broker advertises under its service name.
    for name in SHOPPULSE_SERVICES + ("topic-setup",):
        host, _, port = env_of(services[name])["KAFKA_BOOTSTRAP_SERVERS"].rpartition(":")
        assert host in services and services[host].get("image", "").startswith("apache/kafka")
        match = [ln for ln, (h, p) in advertised.items() if (h, p) == (host, int(port))]
        assert match and listeners[match[0]][1] == int(port), f"{name}: {host}:{port} is not an advertised listener"
    # From the host, the CLI's default KAFKA_BOOTSTRAP_SERVERS reaches the broker.
    host_listener = [ln for ln, (h, _) in advertised.items() if h in ("127.0.0.1", "localhost")]
    assert len(host_listener) == 1
    published = [
        interpolate(m).split(":")
        for m in services["kafka"]["ports"]
        if int(interpolate(m).split(":")[-1]) == listeners[host_listener[0]][1]
    ]
    assert len(published) == 1, "publish the host listener's port, once"
    ((host_ip, host_port, _),) = published
    assert host_ip == "127.0.0.1", "a PLAINTEXT broker without authentication stays on the loopback"
    assert f"{host_ip}:{host_port}" == DEFAULTS["bootstrap_servers"], "the CLI's default must reach the broker"
    assert advertised[host_listener[0]] == (host_ip, int(host_port))
    health = " ".join(services["kafka"]["healthcheck"]["test"])
    assert f":{listeners[kafka_env['KAFKA_INTER_BROKER_LISTENER_NAME']][1]}" in health

    # Worker metrics: config default, compose, Dockerfile EXPOSE/ENV and the Prometheus target agree.
    metrics_port = int(env_of(services["worker"]).get("SHOPPULSE_METRICS_PORT", DEFAULTS["metrics_port"]))
    assert metrics_port == int(DEFAULTS["metrics_port"])
    assert [int(p) for p in services["worker"].get("expose", [metrics_port])] == [metrics_port]
    for path in DOCKERFILES.values():
        stage = final_stage(parse_dockerfile(path))
        exposed = [int(p.split("/")[0]) for keyword, args in stage if keyword == "EXPOSE" for p in args.split()]
        assert exposed == [metrics_port], f"{path.name} EXPOSE {exposed}"
        assert int(dockerfile_env(stage).get("SHOPPULSE_METRICS_PORT", metrics_port)) == metrics_port
    (job,) = [j for j in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"] if j["job_name"] == "shoppulse-worker"]
    (sd,) = job["dns_sd_configs"]
    assert sd["type"] == "A" and sd["port"] == metrics_port
    assert set(sd["names"]) & {"worker", "tasks.worker"}, "discover the replicas of the worker service"

    # Grafana reaches Prometheus on the port Prometheus listens on.
    (datasource,) = load_yaml(GRAFANA_DATASOURCE)["datasources"]
    prom_ports = {int(interpolate(p).split(":")[-1]) for p in services["prometheus"]["ports"]}
    assert datasource["url"] in {f"http://prometheus:{p}" for p in prom_ports}


def _bind_mounts(service: dict) -> list[tuple[str, str]]:
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            source, target = volume.get("source"), volume.get("target")
        else:
            source, _, rest = volume.partition(":")
            target = rest.split(":")[0]
        if source and source.startswith((".", "/")) and target:
            mounts.append((source, target))
    return mounts


def test_mounted_and_built_files_exist(services):
    for name, service in services.items():
        for source, _ in _bind_mounts(service):
            assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repository"
        build = service.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file()
    prometheus = dict((target, source) for source, target in _bind_mounts(services["prometheus"]))
    config_target = "/etc/prometheus/prometheus.yml"
    assert Path(prometheus[config_target]).resolve() == PROMETHEUS_CONFIG.resolve()
    assert f"--config.file={config_target}" in services["prometheus"]["command"]
    for rule_file in load_yaml(PROMETHEUS_CONFIG)["rule_files"]:
        assert (PROMETHEUS_CONFIG.parent / rule_file).is_file()
        in_container = str(Path(config_target).parent / rule_file)
        assert (ROOT / prometheus[in_container]).resolve() == (PROMETHEUS_CONFIG.parent / rule_file).resolve()
    grafana = {target: (ROOT / source).resolve() for source, target in _bind_mounts(services["grafana"])}
    assert grafana["/etc/grafana/provisioning/datasources"] == GRAFANA_DATASOURCE.parent.resolve()
    assert grafana["/etc/grafana/provisioning/dashboards"] == GRAFANA_PROVIDER.parent.resolve()
    (provider,) = load_yaml(GRAFANA_PROVIDER)["providers"]
    assert grafana[provider["options"]["path"]] == DASHBOARD.parent.resolve()
    home = env_of(services["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert grafana[str(Path(home).parent)] / Path(home).name == DASHBOARD.resolve()


def _topic_setup_script(services) -> tuple[list[str], list[str], str]:
    """(loop variables, create-command argv, whole script) of the topic-setup service."""
    command = command_of(services["topic-setup"])
    script = interpolate(command[-1])
    (loop,) = re.findall(r"^\s*for topic in (.*?); do\s*$", script, re.M)
    (create,) = [line for line in script.splitlines() if "--create" in line]
    return loop.split(), shlex.split(create), script


def topic_setup_topics(services) -> list[str]:
    """The topics the topic-setup service creates, by name, in its order."""
    env = env_of(services["topic-setup"])
    loop_vars, _, _ = _topic_setup_script(services)
    assert all(v.startswith("$") for v in loop_vars)
    return [env[v.lstrip("$").strip("{}")] for v in loop_vars]


def test_topic_setup_creates_the_required_topics(services):
    setup = services["topic-setup"]
    assert setup["image"] == services["kafka"]["image"]
    assert setup["depends_on"]["kafka"]["condition"] == "service_healthy"
    env = env_of(setup)
    _, create, script = _topic_setup_script(services)
    names = topic_setup_topics(services)
    expected = required_topics(Settings.from_env({}))
    assert names == [t.name for t in expected], "topic-setup must create exactly streams.kafka.clients.required_topics"
    assert create[0] == "/opt/kafka/bin/kafka-topics.sh" and "--if-not-exists" in create
    assert create[create.index("--topic") + 1] == "$topic", "one create command for every topic of the loop"

    def value(flag: str) -> str:
        raw = create[create.index(flag) + 1]
        return env[raw.lstrip("$")] if raw.startswith("$") else raw

    partitions = int(value("--partitions"))
    configs = dict(create[i + 1].split("=", 1) for i, arg in enumerate(create) if arg == "--config")
    for spec in expected:
        assert configs == spec.config, f"{spec.name}: topic configs differ from streams.kafka.clients.required_topics"
    assert value("--bootstrap-server") == env["KAFKA_BOOTSTRAP_SERVERS"]
    assert "PartitionCount" in script and "exit 1" in script, "fail when an existing topic has another count"

    # The same partition count everywhere: workers (their changelog too), generator, broker default.
    for name in SHOPPULSE_SERVICES:
        settings = Settings.from_env(env_of(services[name]))
        assert settings.partitions == partitions, f"{name} uses {settings.partitions} partitions, topics {partitions}"
        assert [(t.name, t.partitions) for t in required_topics(settings)] == [(n, partitions) for n in names]
        assert settings.replication_factor == int(value("--replication-factor"))
    assert int(env_of(services["kafka"])["KAFKA_NUM_PARTITIONS"]) == partitions
    assert partitions == 8, "the compose default is 8 partitions (SHOPPULSE_PARTITIONS overrides it)"
    assert int(env_of(setup, {"SHOPPULSE_PARTITIONS": "12"})["SHOPPULSE_PARTITIONS"]) == 12


def test_generator_waits_for_topics_and_has_no_healthcheck(services):
    generator = services["generator"]
    assert generator["depends_on"]["topic-setup"]["condition"] == "service_completed_successfully"
    assert generator["healthcheck"] == {"disable": True}, "the image's /healthz check does not apply to generate"


# --------------------------------------------------------------------------- Dockerfiles


def test_dockerfiles_match_the_code():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["shoppulse"] == "streams.tools.cli:main"
    for kind, path in DOCKERFILES.items():
        instructions = parse_dockerfile(path)
        stage = final_stage(instructions)
        keywords = [keyword for keyword, _ in stage]
        base = stage[0][1].split()[0]
        if kind == "cpu":
            assert base.startswith("python:3.11-slim")
            assert any(
                "--extra-index-url https://download.pytorch.org/whl/cpu" in args
                for keyword, args in instructions
                if keyword == "RUN"
            )
        else:
            assert base.startswith(("nvidia/cuda:", "pytorch/pytorch:")) and "runtime" in base
        (entrypoint,) = [exec_form(a) for k, a in stage if k == "ENTRYPOINT"]
        (cmd,) = [exec_form(a) for k, a in stage if k == "CMD"]
        assert entrypoint == ["shoppulse"] and cmd == ["worker"]
        assert parse_args(cmd).command == "worker"
        users = [args for keyword, args in stage if keyword == "USER"]
        assert users and users[-1] not in ("root", "0"), f"{path.name}: run as a non-root user"
        assert keywords.index("USER") < keywords.index("ENTRYPOINT")
        env = dockerfile_env(stage)
        unknown = sorted(k for k in env if k.startswith(("SHOPPULSE_", "KAFKA_")) and k not in SETTING_VARS)
        assert not unknown, f"{path.name} sets {unknown}, unknown to SETTINGS_DOC"
        Settings.from_env({k: v for k, v in env.items() if k in SETTING_VARS})
        assert env["SHOPPULSE_METRICS_HOST"] == "0.0.0.0"
        volumes = [v for keyword, args in stage if keyword == "VOLUME" for v in exec_form(args)]
        assert volumes == [env["SHOPPULSE_DATA_DIR"]] == ["/var/lib/shoppulse"]
        assert "HEALTHCHECK" in keywords


def _ignored(path: str, patterns: list[str]) -> bool:
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(prefix, pattern) for pattern in patterns for prefix in prefixes)


def test_dockerignore_keeps_the_context_small_but_sufficient():
    patterns = [
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for must in (".venv", "var", ".git", "tests"):
        assert _ignored(must, patterns), f".dockerignore should exclude {must}"
    for path in DOCKERFILES.values():
        for keyword, args in parse_dockerfile(path):
            if keyword == "COPY" and not args.startswith("--from"):
                *sources, _ = [a for a in shlex.split(args) if not a.startswith("--")]
                for source in sources:
                    assert (ROOT / source).exists(), f"{path.name} copies {source}, missing"
                    assert not _ignored(source, patterns), f"{path.name} copies {source}, but .dockerignore drops it"


# --------------------------------------------------------------------------- metrics in rules and dashboard

KNOWN_METRICS = set(METRIC_NAMES) | set(PLANNED_METRICS) | set(PROMETHEUS_METRICS)


def test_alert_rules_use_known_metrics():
    rules = alert_rules()
    assert rules
    for rule in rules:
        used = {family(name) for name in promql_metric_names(rule["expr"])}
        assert used, f"{rule.get('alert')}: no metric found in {rule['expr']!r}"
        unknown = sorted(used - KNOWN_METRICS)
        assert not unknown, (
            f"alert {rule.get('alert')} uses {unknown}: not in streams.worker.metrics.METRIC_NAMES; "
            "export it or add it to PLANNED_METRICS"
        )
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]


def test_alert_rules_cover_the_runbook():
    exprs = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    assert "shoppulse_consumer_lag" in exprs["ShopPulseConsumerLagGrowing"]
    assert "shoppulse_dead_letter_total" in exprs["ShopPulseDeadLetterRateHigh"]
    assert "histogram_quantile(0.99" in exprs["ShopPulseEndToEndLatencyHigh"]
    assert "shoppulse_end_to_end_latency_seconds_bucket" in exprs["ShopPulseEndToEndLatencyHigh"]
    no_scores = exprs["ShopPulseNoScoresPublished"]
    assert "shoppulse_results_published_total" in no_scores and "shoppulse_events_consumed_total" in no_scores
    assert "shoppulse_ready" in exprs["ShopPulseWorkerNotReady"]
    assert "shoppulse_live_feature_psi" in exprs["ShopPulseFeatureDrift"] and "> 0.2" in exprs["ShopPulseFeatureDrift"]


def test_alert_unit_tests_cover_at_least_two_alerts():
    tests = load_yaml(ALERTS_TEST)
    assert tests["rule_files"] == [ALERTS.name]
    tested = {case["alertname"] for test in tests["tests"] for case in test.get("alert_rule_test", [])}
    assert len(tested) >= 2 and tested <= {rule["alert"] for rule in alert_rules()}
    for test in tests["tests"]:
        for series in test["input_series"]:
            name = family(series["series"].split("{")[0])
            assert name in KNOWN_METRICS, f"alerts_test.yml feeds {name}, which nothing exports"


def test_dashboard_uses_known_metrics_and_the_provisioned_datasource():
    dashboard = json.loads(DASHBOARD.read_text())
    (datasource,) = load_yaml(GRAFANA_DATASOURCE)["datasources"]
    used = set()
    for panel in dashboard_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == datasource["uid"]
        for target in panel["targets"]:
            names = {family(n) for n in promql_metric_names(target["expr"])}
            unknown = sorted(names - KNOWN_METRICS)
            assert not unknown, (
                f"panel {panel['title']!r} queries {unknown}: not in streams.worker.metrics.METRIC_NAMES; "
                "export it or add it to PLANNED_METRICS"
            )
            assert target.get("datasource", datasource)["uid"] == datasource["uid"]
            used |= names
    for needed in (
        "shoppulse_events_consumed_total",
        "shoppulse_invalid_events_total",
        "shoppulse_dead_letter_total",
        "shoppulse_batch_size",
        "shoppulse_batch_processing_seconds",
        "shoppulse_end_to_end_latency_seconds",
        "shoppulse_results_published_total",
        "shoppulse_ready",
        "shoppulse_consumer_lag",
    ):
        assert needed in used, f"the dashboard has no panel for {needed}"
    ids = [p["id"] for p in dashboard_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] and "id" not in dashboard


# --------------------------------------------------------------------------- docs


def test_deploy_docs_cover_running_scaling_and_security():
    docs = DOCS.read_text()
    for needed in (
        "docker compose up",
        "--scale worker=",
        "deploy/Dockerfile",
        "deploy/Dockerfile.cuda",
        "deploy/prometheus/alerts.yml",
        "deploy/grafana/",
        "SHOPPULSE_CREATE_TOPICS",
    ):
        assert needed in docs, f"docs/deploy.md does not mention {needed}"
    for var in SETTING_VARS:
        if var.startswith(("KAFKA_SASL_", "KAFKA_SSL_")) or var == "KAFKA_SECURITY_PROTOCOL":
            assert f"`{var}`" in docs, f"docs/deploy.md does not mention {var}"


# --------------------------------------------------------------------------- real tools


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed; `make test` installs it (Debian package `prometheus`)")
        pytest.skip("promtool is not installed (apt-get install prometheus; `make test` installs it)")
    return path


def _promtool(promtool: str, *args: str) -> None:
    result = subprocess.run([promtool, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"


def test_promtool_check_config(promtool):
    _promtool(promtool, "check", "config", str(PROMETHEUS_CONFIG.relative_to(ROOT)))


def test_promtool_check_rules(promtool):
    _promtool(promtool, "check", "rules", str(ALERTS.relative_to(ROOT)))


def test_promtool_test_rules(promtool):
    _promtool(promtool, "test", "rules", str(ALERTS_TEST.relative_to(ROOT)))


def test_archive_and_retrain_share_the_archive_and_retrain_writes_the_registry(services):
    from models.retrain import build_retrain_parser
    from streams.tools.retrain import retrain_argv

    archive, retrain = services["archive"], services["retrain"]
    assert archive.get("profiles") == ["archive"] and retrain.get("profiles") == ["retrain"]
    assert archive["depends_on"]["topic-setup"]["condition"] == "service_completed_successfully"
    archive_settings, retrain_settings = Settings.from_env(env_of(archive)), Settings.from_env(env_of(retrain))
    assert archive_settings.archive_dir == retrain_settings.archive_dir
    volumes, roots = {}, {}
    for name, service in (("archive", archive), ("retrain", retrain)):
        mounts = {str(interpolate(v)).split(":")[1]: str(interpolate(v)).split(":")[0] for v in service["volumes"]}
        (roots[name],) = [m for m in mounts if str(archive_settings.archive_dir).startswith(m + "/")]
        volumes[name] = mounts[roots[name]]
    assert volumes["archive"] == volumes["retrain"] == "archive", "one named volume holds the archive for both"
    assert "archive" in load_yaml(COMPOSE_FILE)["volumes"]
    models = [str(interpolate(v)) for v in retrain["volumes"]]
    models = [v for v in models if v.split(":")[1] == str(retrain_settings.models_dir)]
    assert models and not models[0].endswith(":ro"), "retrain registers challengers: the registry is writable"
    options = build_retrain_parser().parse_args(retrain_argv(command_of(retrain)[1:], retrain_settings))
    assert options.archive == str(retrain_settings.archive_dir)
    assert options.every_hours > 0, "compose has no cron: the service runs on its own schedule"
    assert options.reports.startswith(roots["retrain"] + "/"), "the reports outlive the container"
