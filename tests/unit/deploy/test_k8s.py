"""deploy/k8s/ agrees with the code, the image and docker-compose.yml; no cluster is needed.

The manifests are parsed with PyYAML and checked against ``streams.config`` (every variable a
setting), ``streams.tools.cli`` (the container's subcommand), ``streams.worker.metrics`` (probe paths, run
for real against the worker's metrics server), ``streams.kafka.clients`` (the topic Job, whose script
is run with a stand-in for ``kafka-topics.sh``), ``deploy/Dockerfile`` (uid, volume, port) and
``docker-compose.yml`` (images, topics, grace period). Where ``kubectl`` is installed,
``kubectl kustomize`` renders the kustomization as well.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import stat
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from streams.config import Settings
from streams.kafka.clients import required_topics
from streams.tools.cli import parse_args
from streams.worker.metrics import HealthState, MetricsServer, WorkerMetrics
from tests.unit.deploy.test_compose import (
    DOCKERFILES,
    DOCS,
    PROMETHEUS_CONFIG,
    ROOT,
    SETTING_VARS,
    alert_rules,
    command_of,
    dockerfile_env,
    env_of,
    exec_form,
    final_stage,
    interpolate,
    load_yaml,
    parse_dockerfile,
)

K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"
#: The optional KEDA autoscaler, a kustomize Component outside the base.
KEDA_COMPONENT = K8S / "components" / "keda-autoscaling"
#: Files in deploy/k8s that `kubectl apply -k` must not apply (placeholders to fill in first).
TEMPLATE_SUFFIX = ".template.yaml"
WORKER = "shoppulse-worker"
TOPICS_JOB = "shoppulse-topics"
KAFKA_TOPICS_SH = "/opt/kafka/bin/kafka-topics.sh"


# --------------------------------------------------------------------------- helpers


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p != KUSTOMIZATION)


@pytest.fixture(scope="module")
def docs_by_file() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d is not None] for p in _manifest_files()}


@pytest.fixture(scope="module")
def resources(docs_by_file) -> dict[tuple[str, str], dict]:
    """(kind, name) -> manifest, templates included."""
    return {(d["kind"], d["metadata"]["name"]): d for docs in docs_by_file.values() for d in docs}


def one(resources: dict, kind: str, name: str | None = None) -> dict:
    found = [d for (k, n), d in resources.items() if k == kind and name in (None, n)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def config(resources) -> dict[str, str]:
    return one(resources, "ConfigMap", "shoppulse-config")["data"]


@pytest.fixture(scope="module")
def worker(resources) -> dict:
    return one(resources, "StatefulSet", WORKER)


@pytest.fixture(scope="module")
def job(resources) -> dict:
    return one(resources, "Job", TOPICS_JOB)


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def container(workload: dict) -> dict:
    (only,) = pod_spec(workload)["containers"]
    return only


def pod_labels(workload: dict) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def container_env(c: dict, resources: dict) -> dict[str, str]:
    """What the container's environment holds: envFrom sources first, then env (values or '')."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env.update(one(resources, "ConfigMap", source["configMapRef"]["name"])["data"])
        elif "secretRef" in source:
            env.update(one(resources, "Secret", source["secretRef"]["name"])["stringData"])
        else:
            pytest.fail(f"unexpected envFrom source {source}")
    for item in c.get("env", []):
        env[item["name"]] = str(item.get("value", ""))
    return env


def kubelet_expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's expansion of ``$(NAME)`` in command/args (``$$`` is an escaped ``$``)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                close = text.find(")", i + 2)
                if close != -1:
                    name = text[i + 2 : close]
                    out.append(env[name] if name in env else text[i : close + 1])
                    i = close + 1
                    continue
        out.append(text[i])
        i += 1
    return "".join(out)


_CPU = re.compile(r"^(\d+(?:\.\d+)?)(m?)$")
_MEMORY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_MEMORY_UNITS = {
    None: 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def cpu_cores(quantity) -> float:
    match = _CPU.match(str(quantity))
    assert match, f"cpu quantity {quantity!r}"
    return float(match.group(1)) / (1000 if match.group(2) else 1)


def memory_bytes(quantity) -> float:
    match = _MEMORY.match(str(quantity))
    assert match, f"memory quantity {quantity!r}"
    return float(match.group(1)) * _MEMORY_UNITS[match.group(2)]


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, f"duration {duration!r}"
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def image_user(path: Path) -> tuple[str, int, int]:
    """(USER, uid, gid) of a Dockerfile's final stage, from its useradd/groupadd."""
    stage = final_stage(parse_dockerfile(path))
    user = [args for keyword, args in stage if keyword == "USER"][-1]
    runs = " ".join(args for keyword, args in stage if keyword == "RUN")
    (uid,) = re.findall(rf"useradd [^&]*--uid (\d+)[^&]* {re.escape(user)}\b", runs)
    (group,) = re.findall(rf"useradd [^&]*--gid (\S+)[^&]* {re.escape(user)}\b", runs)
    gid = group if group.isdigit() else re.findall(rf"groupadd [^&]*--gid (\d+)[^&]* {re.escape(group)}\b", runs)[0]
    return user, int(uid), int(gid)


# --------------------------------------------------------------------------- files


def test_every_manifest_parses_and_the_kustomization_lists_them(docs_by_file, resources):
    kustomization = load_yaml(KUSTOMIZATION)
    assert kustomization["kind"] == "Kustomization"
    assert "namespace" not in kustomization, "no namespace: `kubectl apply -k ... -n NS` picks it"
    listed = kustomization["resources"]
    applied = {p.name for p in _manifest_files() if not p.name.endswith(TEMPLATE_SUFFIX)}
    assert sorted(listed) == sorted(applied), "kustomization.yaml must list every manifest but the templates"
    for name, docs in docs_by_file.items():
        assert len(docs) == 1, f"{name}: one resource per file"
        (doc,) = docs
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), name
        assert "namespace" not in doc["metadata"], f"{name}: manifests are namespace-less"
    assert len(resources) == len(docs_by_file), "(kind, name) pairs must be unique"
    for kind in (
        "ConfigMap",
        "Secret",
        "StatefulSet",
        "Service",
        "PodMonitor",
        "Job",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
    ):
        assert any(k == kind for k, _ in resources), f"deploy/k8s has no {kind}"


def test_secret_is_a_clearly_marked_template(docs_by_file, resources):
    (template,) = [n for n in docs_by_file if n.endswith(TEMPLATE_SUFFIX)]
    secret = one(resources, "Secret")
    assert docs_by_file[template] == [secret]
    assert "TEMPLATE" in (K8S / template).read_text().splitlines()[0]
    assert set(secret["stringData"]) == {v for v in SETTING_VARS if v.startswith("KAFKA_SASL_")}
    for key, value in secret["stringData"].items():
        assert value.startswith("REPLACE_ME"), f"{key}: placeholders only, never a real credential"
    for workload in (one(resources, "StatefulSet"), one(resources, "Job")):
        refs = [s["secretRef"] for s in container(workload).get("envFrom", []) if "secretRef" in s]
        assert refs == [{"name": secret["metadata"]["name"], "optional": True}], (
            f"{workload['metadata']['name']} reads the Secret, and runs without one (PLAINTEXT)"
        )


# --------------------------------------------------------------------------- settings


def test_configmap_holds_valid_shoppulse_settings(config, compose):
    assert all(isinstance(v, str) for v in config.values()), "ConfigMap values must be strings: quote numbers"
    unknown = sorted(set(config) - SETTING_VARS)
    assert not unknown, f"not in streams.config.SETTINGS_DOC: {unknown}"
    settings = Settings.from_env(config)
    assert settings.create_topics is False, "the Job creates the topics, not racing replicas"
    assert settings.metrics_host == "0.0.0.0", "probes and Prometheus come from outside the pod"
    assert str(settings.data_dir) == "/var/lib/shoppulse" and str(settings.models_dir) == "/models"
    # Same topic names and partition count as the compose stack.
    compose_env = {k: str(interpolate(v)) for k, v in compose["x-shoppulse-env"].items()}
    compose_settings = Settings.from_env(compose_env)
    assert [(t.name, t.partitions) for t in required_topics(settings)] == [
        (t.name, t.partitions) for t in required_topics(compose_settings)
    ]


def test_every_environment_variable_is_a_setting(resources):
    for workload in (one(resources, "StatefulSet"), one(resources, "Job")):
        for c in pod_spec(workload)["containers"] + pod_spec(workload).get("initContainers", []):
            env = container_env(c, resources)
            unknown = sorted(set(env) - SETTING_VARS)
            assert not unknown, f"{workload['metadata']['name']}/{c['name']}: {unknown} are not ShopPulse settings"
        assert pod_spec(workload)["enableServiceLinks"] is False, (
            "Service links inject KAFKA_PORT=tcp://... and the like into the environment"
        )


# --------------------------------------------------------------------------- the worker


def test_worker_runs_the_image_compose_builds(worker, services):
    c = container(worker)
    compose_worker = services["worker"]
    assert compose_worker["build"]["dockerfile"] == "deploy/Dockerfile"
    assert c["image"] == compose_worker["image"], "the image docker-compose.yml builds from deploy/Dockerfile"
    assert "command" not in c, 'keep the image\'s ENTRYPOINT ["shoppulse"]'
    stage = final_stage(parse_dockerfile(DOCKERFILES["cpu"]))
    assert [exec_form(a) for k, a in stage if k == "ENTRYPOINT"] == [["shoppulse"]]
    try:
        args = parse_args(c["args"])
    except (SystemExit, argparse.ArgumentError):
        pytest.fail(f"`shoppulse {' '.join(c['args'])}` is not a subcommand the image runs")
    assert args.command == c["args"][0] == "worker"
    assert c["args"] == command_of(compose_worker)


def test_probes_and_ports_match_the_metrics_server(worker, config, resources):
    c = container(worker)
    port = int(config["SHOPPULSE_METRICS_PORT"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": port}
    stage = final_stage(parse_dockerfile(DOCKERFILES["cpu"]))
    assert [args for keyword, args in stage if keyword == "EXPOSE"] == [str(port)]
    image_env = dockerfile_env(stage)
    for var in ("SHOPPULSE_METRICS_PORT", "SHOPPULSE_METRICS_HOST", "SHOPPULSE_DATA_DIR"):
        assert config[var] == image_env[var], f"{var}: the ConfigMap and deploy/Dockerfile's ENV differ"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        target = c[probe]["httpGet"]["port"]
        assert ports.get(target, target) == port, f"{probe} checks port {target}, the server listens on {port}"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == c["startupProbe"]["httpGet"]["path"] == "/healthz"
    service = one(resources, "Service", worker["spec"]["serviceName"])
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == port and ports.get(service_port["targetPort"]) == port
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port) and annotations["prometheus.io/path"] == "/metrics"


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_probe_paths_answer_as_kubernetes_expects(worker):
    """Readiness fails until the worker is ready; liveness and start-up fail only when it is dead."""
    c = container(worker)
    health = HealthState()
    server = MetricsServer(WorkerMetrics(), health, "127.0.0.1", 0).start()
    try:

        def probe(name: str) -> int:
            return _status(server.url + c[name]["httpGet"]["path"])

        assert (probe("startupProbe"), probe("livenessProbe"), probe("readinessProbe")) == (200, 200, 503)
        health.ready = True
        assert probe("readinessProbe") == 200
        health.alive = False
        assert (probe("startupProbe"), probe("livenessProbe")) == (503, 503)
        assert _status(server.url + "/metrics") == 200
    finally:
        server.stop()


def test_volumes_hold_the_tables_and_the_models(worker, config, resources, services):
    spec = worker["spec"]
    mounts = {m["mountPath"]: m for m in container(worker)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(worker)["volumes"]}
    claims = {t["metadata"]["name"]: t for t in spec["volumeClaimTemplates"]}
    assert not set(volumes) & set(claims)
    for m in mounts.values():
        assert m["name"] in volumes or m["name"] in claims, f"{m['mountPath']}: no volume {m['name']}"

    data_dir = config["SHOPPULSE_DATA_DIR"]
    image_volumes = [
        v for k, a in final_stage(parse_dockerfile(DOCKERFILES["cpu"])) if k == "VOLUME" for v in exec_form(a)
    ]
    assert image_volumes == [data_dir], "SHOPPULSE_DATA_DIR is the image's VOLUME"
    data = mounts[data_dir]
    assert data["name"] in claims, "RocksDB needs a volume of its own per replica: a volumeClaimTemplate"
    assert not data.get("readOnly")
    assert claims[data["name"]]["spec"]["accessModes"] == ["ReadWriteOnce"]

    models = mounts[config["SHOPPULSE_MODELS_DIR"]]
    assert models["readOnly"] is True, "workers only read the registry"
    assert config["SHOPPULSE_MODELS_DIR"] == env_of(services["worker"])["SHOPPULSE_MODELS_DIR"], (
        "compose and Kubernetes mount the registry at one path"
    )
    claim = volumes[models["name"]]["persistentVolumeClaim"]
    assert claim == {"claimName": "shoppulse-models", "readOnly": True}
    pvc = one(resources, "PersistentVolumeClaim", "shoppulse-models")
    assert set(pvc["spec"]["accessModes"]) & {"ReadWriteMany", "ReadOnlyMany"}, "every replica mounts it"


def test_worker_runs_as_the_image_user(worker):
    users = {image_user(path) for path in DOCKERFILES.values()}
    assert len(users) == 1, f"the Dockerfiles disagree on the user: {users}"
    ((_, uid, gid),) = users
    assert uid != 0
    pod = pod_spec(worker)["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (uid, gid, gid)
    c = container(worker)["securityContext"]
    assert c["allowPrivilegeEscalation"] is False and c["capabilities"]["drop"] == ["ALL"]
    if c.get("readOnlyRootFilesystem"):
        paths = {m["mountPath"] for m in container(worker)["volumeMounts"]}
        assert "/tmp" in paths, "a read-only root needs a writable /tmp"


def test_statefulset_scales_within_the_partitions_and_stops_gracefully(worker, config, resources, services):
    spec = worker["spec"]
    assert spec["podManagementPolicy"] == "Parallel"
    assert 1 <= spec["replicas"] <= int(config["SHOPPULSE_PARTITIONS"]), (
        "replicas beyond SHOPPULSE_PARTITIONS get no partition and never become ready"
    )
    labels = pod_labels(worker)
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    service = one(resources, "Service", spec["serviceName"])
    assert service["spec"]["clusterIP"] == "None", "the StatefulSet's governing Service is headless"
    assert service["spec"]["selector"].items() <= labels.items()
    grace = pod_spec(worker)["terminationGracePeriodSeconds"]
    assert grace >= seconds(services["worker"]["stop_grace_period"]), (
        "at least compose's stop_grace_period to commit offsets and close the tables"
    )
    resources_ = container(worker)["resources"]
    requests, limits = resources_["requests"], resources_["limits"]
    assert cpu_cores(requests["cpu"]) <= cpu_cores(limits["cpu"])
    assert memory_bytes(requests["memory"]) <= memory_bytes(limits["memory"])
    threads = int(config.get("SHOPPULSE_TORCH_THREADS", "0"))
    assert threads <= cpu_cores(limits["cpu"]), "more torch threads than the CPU limit only adds throttling"


def test_pod_monitor_scrapes_the_worker_pods_as_the_alerts_expect(worker, job, resources):
    monitor = one(resources, "PodMonitor", WORKER)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels(worker).items(), "the PodMonitor must select the worker pods"
    assert not selector.items() <= pod_labels(job).items(), "... and not the topic Job's pod"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in container(worker)["ports"]}
    assert endpoint["path"] == "/metrics"
    assert seconds(endpoint["interval"]) == seconds(load_yaml(PROMETHEUS_CONFIG)["global"]["scrape_interval"])
    # alerts.yml and the dashboard select job="shoppulse-worker"; the operator's default job
    # label would be <namespace>/<podmonitor>.
    jobs = {r["replacement"] for r in endpoint["relabelings"] if r.get("targetLabel") == "job"}
    wanted = {m for rule in alert_rules() for m in re.findall(r'job="([^"]+)"', rule["expr"])}
    assert jobs == wanted == {WORKER}


# --------------------------------------------------------------------------- the topic Job


def test_topics_job_uses_the_compose_kafka_image(job, services):
    c = container(job)
    assert c["image"] == services["topic-setup"]["image"] == services["kafka"]["image"]
    assert pod_spec(job)["restartPolicy"] in ("Never", "OnFailure")
    assert pod_spec(job)["securityContext"]["runAsNonRoot"] is True
    assert pod_spec(job)["securityContext"]["runAsUser"] != 0


@pytest.fixture(scope="module")
def topics_script(job, resources) -> str:
    c = container(job)
    assert c["command"][0] == "/bin/bash" and c["command"][-1] == "-c"
    (script,) = c["args"]
    env = container_env(c, resources)
    assert kubelet_expand(script, env) == script, "the kubelet would rewrite $(NAME) or $$ in the script"
    return script


def _run_topics_script(script: str, env: dict[str, str], tmp: Path, partitions_found: str) -> tuple[int, list, str]:
    """Run the Job's script with a stand-in kafka-topics.sh; (exit code, calls, stderr)."""
    log = tmp / "calls.log"
    stub = tmp / "kafka-topics.sh"
    stub.write_text(
        '#!/bin/bash\n(IFS=$\'\\x1f\'; echo "$*") >> "$STUB_LOG"\n'
        'case " $* " in *" --describe "*) printf \'Topic: t\\tTopicId: x\\tPartitionCount: %s\\t'
        'ReplicationFactor: 1\\tConfigs: \\n\' "$STUB_PARTITIONS";; esac\n'
    )
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    assert script.count(KAFKA_TOPICS_SH) == 2
    run_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TMPDIR": str(tmp),
        "STUB_LOG": str(log),
        "STUB_PARTITIONS": partitions_found,
        **env,
    }
    result = subprocess.run(
        ["/bin/bash", "-euo", "pipefail", "-c", script.replace(KAFKA_TOPICS_SH, str(stub))],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    calls = [line.split("\x1f") for line in log.read_text().splitlines()] if log.exists() else []
    return result.returncode, calls, result.stderr


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_topics_job_creates_the_required_topics(job, topics_script, resources, tmp_path):
    env = container_env(container(job), resources)
    env.update(
        KAFKA_SECURITY_PROTOCOL="SASL_SSL",
        KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
        KAFKA_SASL_USERNAME="shoppulse",
        KAFKA_SASL_PASSWORD="s3cret",
        KAFKA_SSL_CAFILE="/etc/tls/ca.pem",
    )
    settings = Settings.from_env(env)
    code, calls, stderr = _run_topics_script(topics_script, env, tmp_path, str(settings.partitions))
    assert code == 0, stderr
    creates = [argv for argv in calls if "--create" in argv]
    expected = required_topics(settings)
    assert [_flag(a, "--topic") for a in creates] == [t.name for t in expected], (
        "the Job must create exactly streams.kafka.clients.required_topics"
    )
    for argv, spec in zip(creates, expected, strict=True):
        assert "--if-not-exists" in argv
        assert int(_flag(argv, "--partitions")) == spec.partitions
        assert int(_flag(argv, "--replication-factor")) == settings.replication_factor
        assert _flag(argv, "--bootstrap-server") == settings.bootstrap_servers
        assert dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--config") == spec.config
    assert len([a for a in calls if "--describe" in a]) == len(expected), "every topic's count is checked"
    props_files = {_flag(a, "--command-config") for a in calls}
    assert len(props_files) == 1
    props = Path(props_files.pop()).read_text()
    assert "security.protocol=SASL_SSL" in props and "sasl.mechanism=SCRAM-SHA-512" in props
    assert 'ScramLoginModule required username="shoppulse" password="s3cret";' in props
    assert "ssl.truststore.location=/etc/tls/ca.pem" in props


def test_topics_job_fails_on_another_partition_count(job, topics_script, resources, tmp_path):
    env = container_env(container(job), resources)
    code, calls, stderr = _run_topics_script(topics_script, env, tmp_path, "3")
    assert code != 0 and "SHOPPULSE_PARTITIONS" in stderr
    assert len(calls) == 2, "stop at the first topic with the wrong count"
    props = (tmp_path / "shoppulse-client.properties").read_text()
    assert props == "security.protocol=PLAINTEXT\n", "the Secret's placeholders are unused without SASL"


# --------------------------------------------------------------------------- disruptions and autoscaling


def test_disruption_budget_lets_one_worker_go_at_a_time(worker, job, resources):
    pdb = one(resources, "PodDisruptionBudget", WORKER)
    assert pdb["apiVersion"] == "policy/v1"
    selector = {"matchLabels": worker["spec"]["selector"]["matchLabels"]}
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": selector}, (
        "maxUnavailable 1 (minAvailable would block drains of a single replica), over the workers' pods only"
    )
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(worker).items()
    assert not pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(job).items(), "the Job is no worker"


@pytest.fixture(scope="module")
def keda_component() -> dict:
    return load_yaml(KEDA_COMPONENT / "kustomization.yaml")


@pytest.fixture(scope="module")
def scaled_object(keda_component) -> dict:
    docs = [
        d
        for name in keda_component["resources"]
        for d in yaml.safe_load_all((KEDA_COMPONENT / name).read_text())
        if d is not None
    ]
    (only,) = docs
    assert (only["apiVersion"], only["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    return only


def test_keda_component_adds_the_autoscaler_and_frees_the_replica_count(keda_component):
    assert (keda_component["apiVersion"], keda_component["kind"]) == ("kustomize.config.k8s.io/v1alpha1", "Component")
    assert sorted(keda_component["resources"]) == sorted(
        p.name for p in KEDA_COMPONENT.glob("*.yaml") if p.name != "kustomization.yaml"
    )
    (patch,) = keda_component["patches"]
    assert patch["target"] == {"group": "apps", "version": "v1", "kind": "StatefulSet", "name": WORKER}
    assert yaml.safe_load(patch["patch"]) == [{"op": "remove", "path": "/spec/replicas"}], (
        "`kubectl apply` must not reset the replica count the autoscaler chose"
    )


def test_keda_scales_the_worker_on_the_lag_of_its_input_topics(scaled_object, worker, config, resources):
    spec = scaled_object["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": worker["apiVersion"],
        "kind": worker["kind"],
        "name": worker["metadata"]["name"],
        "envSourceContainerName": container(worker)["name"],
    }
    assert spec["minReplicaCount"] == 1
    assert spec["maxReplicaCount"] == int(config["SHOPPULSE_PARTITIONS"]), (
        "one worker per partition at most: more would idle and never report ready"
    )
    settings = Settings.from_env(config)
    env = container_env(container(worker), resources)
    topics = []
    for trigger in spec["triggers"]:
        assert trigger["type"] == "kafka" and "authenticationRef" not in trigger
        meta = trigger["metadata"]
        assert not {"topic", "consumerGroup", "bootstrapServers"} & set(meta), (
            "read names from the worker's environment (*FromEnv), so they cannot drift from the ConfigMap"
        )
        assert env[meta["bootstrapServersFromEnv"]] == settings.bootstrap_servers
        assert env[meta["consumerGroupFromEnv"]] == settings.app_id, "Faust's consumer group is the app id"
        topics.append(env[meta["topicFromEnv"]])
        assert int(meta["lagThreshold"]) > 0 and meta["lagThreshold"] == spec["triggers"][0]["metadata"]["lagThreshold"]
        assert meta["offsetResetPolicy"] == "earliest", (
            "a new group starts at the earliest offset (streams/worker/app.py)"
        )
        assert meta["allowIdleConsumers"] == "false"
    assert sorted(topics) == sorted(settings.input_topics), "one trigger per input topic"
    scale_down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] >= spec["cooldownPeriod"]
    assert [p["value"] for p in scale_down["policies"] if p["type"] == "Pods"] == [1], "one hand-over at a time"


# --------------------------------------------------------------------------- docs and kubectl


def test_deploy_docs_cover_kubernetes():
    docs = DOCS.read_text()
    for needed in (
        "## Kubernetes",
        "kubectl apply -k deploy/k8s",
        "kubectl scale statefulset/shoppulse-worker",
        "shoppulse-models",
        "secret-kafka.template.yaml",
        "SHOPPULSE_PARTITIONS",
    ):
        assert needed in docs, f"docs/deploy.md does not mention {needed}"


def test_deploy_docs_cover_disruptions_autoscaling_and_helm():
    deploy, scaling = DOCS.read_text(), (ROOT / "docs" / "scaling.md").read_text()
    for needed in (
        "PodDisruptionBudget",
        "maxUnavailable",
        "components/keda-autoscaling",
        "lagThreshold",
        "TriggerAuthentication",
        "## Helm",
    ):
        assert needed in deploy, f"docs/deploy.md does not mention {needed}"
    for needed in ("keda-autoscaling", "lagThreshold", "maxReplicaCount"):
        assert needed in scaling, f"docs/scaling.md does not mention {needed}"


def kustomize(directory: Path) -> list[dict]:
    """``kubectl kustomize DIRECTORY`` as parsed documents; skips where kubectl is not installed."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the static checks above cover the manifests")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_kustomize_renders_the_manifests(resources):
    rendered = {(d["kind"], d["metadata"]["name"]) for d in kustomize(K8S)}
    assert rendered == {key for key in resources if key[0] != "Secret"}


def test_kustomize_renders_an_overlay_with_the_keda_component(resources, scaled_object, tmp_path):
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = os.path.relpath(K8S, overlay)  # kustomize refuses absolute paths
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": [base], "components": [os.path.relpath(KEDA_COMPONENT, overlay)]})
    )
    rendered = {(d["kind"], d["metadata"]["name"]): d for d in kustomize(overlay)}
    assert set(rendered) == {key for key in resources if key[0] != "Secret"} | {("ScaledObject", WORKER)}
    assert rendered[("ScaledObject", WORKER)] == scaled_object
    assert "replicas" not in rendered[("StatefulSet", WORKER)]["spec"]


# --------------------------------------------------------------------------- archive and retrain


def test_the_archiver_and_the_retrain_cronjob_share_the_archive_claim(config, resources, worker):
    from models.retrain import build_retrain_parser
    from streams.tools.retrain import retrain_argv

    archiver = one(resources, "Deployment", "shoppulse-archive")
    cron = one(resources, "CronJob", "shoppulse-retrain")
    retrain = {"spec": cron["spec"]["jobTemplate"]["spec"]}
    settings = Settings.from_env(config)
    archive_dir = str(settings.archive_dir)
    for workload in (archiver, retrain):
        c = container(workload)
        env = container_env(c, resources)
        assert not sorted(set(env) - SETTING_VARS), f"{c['name']}: only ShopPulse settings"
        assert pod_spec(workload)["enableServiceLinks"] is False
        assert c["image"] == container(worker)["image"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod_spec(workload)["securityContext"]["runAsUser"] == image_user(DOCKERFILES["cpu"])[1]
        volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
        (archive_mount,) = [m for m in c["volumeMounts"] if archive_dir.startswith(m["mountPath"] + "/")]
        assert not archive_mount.get("readOnly")
        assert volumes[archive_mount["name"]]["persistentVolumeClaim"]["claimName"] == "shoppulse-archive"
    pvc = one(resources, "PersistentVolumeClaim", "shoppulse-archive")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "two pods, possibly on two nodes, mount it"

    assert parse_args(container(archiver)["args"]).command == "archive"
    assert archiver["spec"]["replicas"] == 1 and archiver["spec"]["strategy"]["type"] == "Recreate", (
        "the old archiver flushes and commits before the new one starts"
    )
    assert cron["spec"]["concurrencyPolicy"] == "Forbid", "two runs would race for the challenger pointer"
    assert pod_spec(retrain)["restartPolicy"] == "Never"
    args = container(retrain)["args"]
    assert parse_args(args).command == "retrain"
    options = build_retrain_parser().parse_args(retrain_argv(args[1:], settings))
    assert options.archive == archive_dir and options.every_hours == 0, "the CronJob is the schedule"
    archive_root = next(m["mountPath"] for m in container(retrain)["volumeMounts"] if m["name"] == "archive")
    assert options.reports.startswith(archive_root + "/"), "reports outlive the Job's pod"
    models = next(m for m in container(retrain)["volumeMounts"] if m["mountPath"] == config["SHOPPULSE_MODELS_DIR"])
    assert not models.get("readOnly"), "retrain registers challengers"
    claim = {v["name"]: v for v in pod_spec(retrain)["volumes"]}[models["name"]]["persistentVolumeClaim"]
    assert claim == {"claimName": "shoppulse-models"}
