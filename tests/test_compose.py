"""docker-compose.yml and the Dockerfile, checked against the code they run.

No Docker engine runs here, so the stack is checked against StreamRec itself: every streamrec
service runs a real ``streamrec`` command with real options (parsed by the CLI's own click tree),
every ``STREAMREC_*`` variable names a setting of the settings tree and the environment builds
valid settings, and the services agree with each other on ports, hosts, volumes and start order.
``docker compose config`` validates the file where that tool is installed.

Walking the settings tree matters: pydantic-settings silently ignores a variable whose name is no
setting (``STREAMREC_KAFKA__BOOTSTRAP_SERVER`` leaves the broker at localhost:9092), so building
the settings alone would not catch a misspelled name.
"""

from __future__ import annotations

import collections.abc
import difflib
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import tomllib
import typing
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import typer.main
import yaml
from pydantic import BaseModel

from learner.service import learner_paths
from streamrec.cli import app
from streamrec.settings import Settings, load_settings

try:  # typer >= 0.2x parses with its own copy of click
    from typer._click.exceptions import UsageError
except ImportError:
    from click.exceptions import UsageError

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PREFIX = "STREAMREC_"
NOT_SETTINGS = {"STREAMREC_CONFIG"}  # read by load_settings: the settings file, not a setting
# what the live stack must run (issue 7): the loop's processes as separate services
LOOP_COMMANDS = {("topics", "create"), ("stream", "worker"), ("learn",), ("serve",), ("replay",), ("policy", "train")}
WITHOUT_KAFKA = {("world", "generate")}  # commands that never talk to the broker


# -- the CLI, as click parses it -------------------------------------------------------------------

class NotACommand(ValueError):
    """argv is not something the ``streamrec`` CLI would run; the message says why."""


def parse_cli(argv: list[str]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Parse ``streamrec ARGV`` like the CLI would, without running it: (command path, parameters).

    >>> command, params = parse_cli(["serve", "--port", "9000"])
    >>> command, params["port"], params["host"]
    (('serve',), 9000, None)
    """
    command = typer.main.get_command(app)
    ctx = None
    name, path, args = "streamrec", [], list(argv)
    shown = f"`streamrec {shlex.join(argv)}`"
    try:
        while hasattr(command, "get_command"):  # a group: its own options (e.g. --config), then a command
            choices = ", ".join(sorted(command.commands))
            if not args:  # (before click, which would print the group's help)
                raise NotACommand(f"{shown}: `{' '.join(['streamrec', *path])}` needs a command, one of: {choices}")
            ctx = command.make_context(name, args, parent=ctx)
            rest = [*ctx._protected_args, *ctx.args]  # where click's Group.invoke finds the command
            if not rest:
                raise NotACommand(f"{shown}: `{' '.join(['streamrec', *path])}` needs a command, one of: {choices}")
            sub = command.get_command(ctx, rest[0])
            if sub is None:
                raise NotACommand(f"{shown}: `{' '.join(['streamrec', *path])}` has no command {rest[0]!r}; it has: {choices}")
            path.append(rest[0])
            name, command, args = rest[0], sub, rest[1:]
        leaf = command.make_context(name, args, parent=ctx)  # unknown options, bad values, missing arguments
    except UsageError as exc:
        raise NotACommand(f"{shown}: {exc.format_message()}") from None
    return tuple(path), leaf.params


# -- the settings tree -----------------------------------------------------------------------------

def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):  # Optional[Model], Model | None
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def _is_mapping(annotation: Any) -> bool:
    origin = typing.get_origin(annotation) or annotation
    if isinstance(origin, type) and issubclass(origin, collections.abc.Mapping):
        return True
    return any(_is_mapping(arg) for arg in typing.get_args(annotation) if arg is not type(None))


def setting_problem(variable: str, model: type[BaseModel] = Settings) -> str | None:
    """Why ``variable`` names no setting of ``model``, or None when it does.

    Names are read as pydantic-settings reads them: ``STREAMREC_`` then the field path joined with
    ``__``, case-insensitive; a dict-valued setting takes any key below it.

    >>> setting_problem("STREAMREC_KAFKA__BOOTSTRAP_SERVERS") is None
    True
    >>> setting_problem("STREAMREC_KAFKA__BOOTSTRAP_SERVER")
    "STREAMREC_KAFKA__BOOTSTRAP_SERVER: kafka has no setting 'bootstrap_server' (did you mean 'bootstrap_servers'?)"
    """
    if not variable.upper().startswith(PREFIX):
        return f"{variable}: not a StreamRec variable (they start with {PREFIX})"
    parts = variable[len(PREFIX):].lower().split("__")
    walked: list[str] = []
    current = model
    for i, part in enumerate(parts):
        fields = current.model_fields
        where = ".".join(walked) or "the settings tree"
        if part not in fields:
            near = difflib.get_close_matches(part, list(fields), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            return f"{variable}: {where} has no setting {part!r}{hint}"
        walked.append(part)
        if i == len(parts) - 1:
            return None
        annotation = fields[part].annotation
        nested = _nested_model(annotation)
        if nested is None:
            if _is_mapping(annotation):
                return None
            return f"{variable}: {'.'.join(walked)} is a single value; it has no {parts[i + 1]!r}"
        current = nested
    return None


# -- the compose file ------------------------------------------------------------------------------

@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    return shlex.split(command) if isinstance(command, str) else list(command or [])


def is_streamrec(service: dict[str, Any]) -> bool:
    return "build" in service or str(service.get("image", "")).startswith("streamrec")


STREAMREC_SERVICES = sorted(name for name, service in services().items() if is_streamrec(service))


def environment(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return dict(env)


def dockerfile_env() -> dict[str, str]:
    """``ENV KEY=VALUE`` of the Dockerfile (the image's defaults under compose's environment)."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip().upper().startswith("ENV "):
            for token in shlex.split(line.strip()[4:]):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def streamrec_env(name: str) -> dict[str, Any]:
    merged = {**dockerfile_env(), **environment(services()[name])}
    return {k: v for k, v in merged.items() if k.upper().startswith(PREFIX)}


def service_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings tree the service's process builds from its environment (and nothing else)."""
    for key in list(os.environ):
        if key.upper().startswith(PREFIX):
            monkeypatch.delenv(key)
    for key, value in streamrec_env(name).items():
        monkeypatch.setenv(key, str(value))
    return load_settings()


def mounts(service: dict[str, Any]) -> list[tuple[str, PurePosixPath]]:
    """(source, container path) of each volume entry, short or long syntax."""
    found = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, str):
            source, target = entry.split(":")[:2]
        else:
            source, target = entry.get("source", ""), entry["target"]
        found.append((source, PurePosixPath(target)))
    return found


def on_volume(name: str, path: str | Path) -> tuple[str, PurePosixPath] | None:
    """(named volume, path inside it) holding ``path`` in service ``name``, or None (container layer)."""
    path = PurePosixPath(str(path).removeprefix("file://"))
    declared = compose().get("volumes") or {}
    best = None
    for source, target in mounts(services()[name]):
        if source in declared and (path == target or target in path.parents):
            if best is None or len(target.parts) > len(best[1].parts):
                best = (source, target)
    return None if best is None else (best[0], path.relative_to(best[1]))


@cache
def parsed(name: str) -> tuple[tuple[str, ...], dict[str, Any]]:
    argv = command_of(services()[name])
    assert argv[:1] == ["streamrec"], f"service {name} runs {argv!r}, not the streamrec CLI"
    return parse_cli(argv[1:])


def running(path: tuple[str, ...]) -> list[str]:
    return [name for name in STREAMREC_SERVICES if parsed(name)[0] == path]


# -- the checks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", STREAMREC_SERVICES)
def test_every_streamrec_service_runs_a_real_cli_command(name):
    argv = command_of(services()[name])
    assert argv[:1] == ["streamrec"], f"service {name}: command {argv!r} should start with `streamrec`"
    try:
        parse_cli(argv[1:])
    except NotACommand as exc:
        pytest.fail(f"service {name}: {exc}", pytrace=False)


def test_the_stack_runs_every_process_of_the_loop():
    commands = {parsed(name)[0] for name in STREAMREC_SERVICES}
    assert LOOP_COMMANDS <= commands, f"missing from docker-compose.yml: {sorted(LOOP_COMMANDS - commands)}"
    assert any(parsed(name)[1]["to_kafka"] for name in running(("replay",))), "no replay service publishes --to-kafka"
    infrastructure = {name: s.get("image", "") for name, s in services().items() if not is_streamrec(s)}
    assert any(image.startswith("apache/kafka:") for image in infrastructure.values())
    assert any(image.startswith("redis:") for image in infrastructure.values())
    # the whole loop comes up by default; a learner on the CPU is part of it, the GPU one a profile away
    for path in (("topics", "create"), ("stream", "worker"), ("learn",), ("serve",)):
        assert any(not services()[name].get("profiles") for name in running(path)), f"no default-profile service runs {path}"


def test_the_gpu_learner_reserves_a_gpu_and_differs_from_the_cpu_learner_only_there(monkeypatch):
    learners = running(("learn",))
    gpu = [name for name in learners if services()[name].get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")]
    cpu = [name for name in learners if name not in gpu]
    assert gpu and cpu, f"want a CPU learner and a GPU learner, have {learners}"
    for name in gpu:
        service = services()[name]
        assert "gpu" in (service.get("profiles") or []), f"{name} reserves a GPU outside a `gpu` profile"
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and (d.get("count") or d.get("device_ids"))
                   for d in devices), f"{name}: {devices} reserves no NVIDIA GPU"
        assert service_settings(name, monkeypatch).learner.device == "cuda"
    for name in cpu:
        assert not services()[name].get("profiles")
        assert service_settings(name, monkeypatch).learner.device in ("cpu", "auto")
    ignore = {"profiles", "deploy", "environment"}
    reference = services()[cpu[0]]
    for name in gpu:
        other = services()[name]
        for key in sorted((set(reference) | set(other)) - ignore):
            assert reference.get(key) == other.get(key), f"{cpu[0]} and {name} differ in {key}"
        env_a, env_b = environment(reference), environment(other)
        differing = {k for k in set(env_a) | set(env_b) if env_a.get(k) != env_b.get(k)}
        assert differing == {"STREAMREC_LEARNER__DEVICE"}, f"{cpu[0]} and {name} differ in {sorted(differing)}"


@pytest.mark.parametrize("name", STREAMREC_SERVICES)
def test_every_streamrec_variable_names_a_setting(name):
    variables = streamrec_env(name)
    assert variables, f"service {name} sets no STREAMREC_* variable"
    problems = [problem for var in variables if var not in NOT_SETTINGS and (problem := setting_problem(var))]
    assert not problems, "\n".join(problems)
    unquoted = {k: v for k, v in environment(services()[name]).items() if not isinstance(v, str)}
    assert not unquoted, f"service {name}: quote these values so YAML keeps them strings: {unquoted}"


@pytest.mark.parametrize("name", STREAMREC_SERVICES)
def test_each_service_builds_valid_settings_that_reach_the_stack(name, monkeypatch):
    settings = service_settings(name, monkeypatch)  # raises SettingsError on a value that does not validate
    if parsed(name)[0] in WITHOUT_KAFKA:
        return
    for server in settings.kafka.bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        assert host in services(), f"service {name}: Kafka host {host!r} is no service of the stack"
        listeners = str(environment(services()[host]).get("KAFKA_ADVERTISED_LISTENERS", ""))
        assert f"//{host}:{port}" in listeners, f"service {name}: {server} is not among Kafka's advertised listeners {listeners}"
    if parsed(name)[0] in {("stream", "worker"), ("serve",)}:  # they share features: one online store
        fs = settings.feature_store
        assert fs.online_store == "redis", f"service {name}: a {fs.online_store} online store is not shared between containers"
        host, _, port = fs.redis_connection_string.split(",")[0].rpartition(":")
        redis = services().get(host)
        assert redis is not None and str(redis.get("image", "")).startswith("redis:"), f"service {name}: {host!r} is not the Redis service"
        redis_port = "6379"
        argv = command_of(redis)
        if "--port" in argv:
            redis_port = argv[argv.index("--port") + 1]
        assert port == redis_port, f"service {name}: Redis listens on {redis_port}, not {port}"


def _container_ports(service: dict[str, Any]) -> set[int]:
    ports = set()
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            ports.add(int(str(entry).split("/")[0].rsplit(":", 1)[-1]))
    return ports


def test_serving_listens_where_it_is_published_and_probed(monkeypatch):
    servers = running(("serve",))
    assert servers
    for name in servers:
        service = services()[name]
        settings = service_settings(name, monkeypatch)
        params = parsed(name)[1]
        port = params["port"] if params["port"] is not None else settings.serving.port
        host = params["host"] if params["host"] is not None else settings.serving.host
        assert host == "0.0.0.0", f"{name} listens on {host}: unreachable from outside its container"
        assert port in _container_ports(service), f"{name} listens on {port} but publishes {sorted(_container_ports(service))}"
        probe = service.get("healthcheck", {}).get("test")
        assert probe, f"{name} has no healthcheck"
        urls = re.findall(r"https?://[^/\s'\"]+:(\d+)(/[\w/]*)", " ".join(probe) if isinstance(probe, list) else probe)
        assert urls, f"{name}: the healthcheck {probe!r} calls no http://host:port/..."
        assert all(int(p) == port and path in ("/healthz", "/readyz") for p, path in urls), \
            f"{name}: the healthcheck calls {urls}, serving answers /healthz and /readyz on {port}"


def test_dependencies_exist_and_can_be_met():
    conditions = {"service_started", "service_healthy", "service_completed_successfully"}
    long_running = {"always", "unless-stopped"}
    for name, service in services().items():
        depends = service.get("depends_on") or {}
        depends = {d: {"condition": "service_started"} for d in depends} if isinstance(depends, list) else depends
        for target, spec in depends.items():
            assert target in services(), f"{name} depends on {target!r}, which is no service"
            condition = spec.get("condition", "service_started")
            assert condition in conditions, f"{name}: unknown condition {condition!r} on {target}"
            other = services()[target]
            if condition == "service_healthy":
                assert other.get("healthcheck", {}).get("test"), f"{name} waits for {target} to be healthy; it has no healthcheck"
            if condition == "service_completed_successfully":
                assert other.get("restart", "no") not in long_running, f"{name} waits for {target} to finish; it restarts forever"
            wanted, offered = set(service.get("profiles") or []), set(other.get("profiles") or [])
            assert not offered or (wanted and wanted <= offered), \
                f"{name} (profiles {sorted(wanted) or 'default'}) depends on {target}, which only runs in {sorted(offered)}"
    # Kafka first, then the topics; every process that talks to Kafka waits for the topics
    creators = running(("topics", "create"))
    for name in creators:
        kafka = services()[name].get("depends_on", {}).get("kafka", {})
        assert kafka.get("condition") == "service_healthy", f"{name} should wait for a healthy Kafka"
    for name in STREAMREC_SERVICES:
        if name in creators or parsed(name)[0] in WITHOUT_KAFKA:
            continue
        depends = services()[name].get("depends_on") or {}
        assert any(depends.get(c, {}).get("condition") == "service_completed_successfully" for c in creators), \
            f"{name} talks to Kafka but does not wait for the topics ({creators}) to be created"


def test_state_lives_on_named_volumes_the_services_share(monkeypatch):
    declared = set(compose().get("volumes") or {})
    used = {source for service in services().values() for source, _ in mounts(service) if not source.startswith(("/", ".", "~"))}
    assert used <= declared, f"volumes used but not declared: {sorted(used - declared)}"
    assert declared <= used, f"volumes declared but never mounted: {sorted(declared - used)}"

    def where(name: str, path: Any, what: str) -> tuple[str, PurePosixPath]:
        found = on_volume(name, path)
        assert found is not None, f"{name} keeps {what} at {path}, which is on no named volume (lost with the container)"
        return found

    registries, checkpoints, feast = {}, {}, {}
    for name in STREAMREC_SERVICES:
        command, params = parsed(name)
        settings = service_settings(name, monkeypatch)
        if command == ("learn",):
            paths = learner_paths(settings.learner, settings.data_dir)
            registries[name] = where(name, paths.registry, "the model registry")
            checkpoints[name] = where(name, paths.checkpoints, "its checkpoints")
        if command == ("serve",):
            registry = params["registry"] or settings.serving.registry_dir or settings.data_dir / "registry"
            registries[name] = where(name, registry, "the model registry")
            feast[name] = where(name, settings.feature_store.data_dir, "Feast's registry")
        if command == ("policy", "train"):  # as streamrec.cli._policy_settings resolves it
            registry = settings.policy.registry or settings.serving.registry_dir or settings.data_dir / "registry"
            registries[name] = where(name, registry, "the model registry")
        if command == ("stream", "worker"):
            feast[name] = where(name, settings.feature_store.data_dir, "Feast's registry and offline files")
            where(name, settings.data_dir / "faust", "its Faust table state")
    for role, places in (("the model registry", registries), ("learner checkpoints", checkpoints), ("Feast data", feast)):
        assert len(places) >= 1 and len(set(places.values())) == 1, f"{role} is not one shared place: {places}"
    assert {"serve", "learn"} <= {parsed(n)[0][0] for n in registries}

    # the replay job reads the log the world job wrote
    for name in running(("replay",)):
        source = parsed(name)[1]["source"]
        if source is None:
            continue
        writers = [w for w in running(("world", "generate")) if str(parsed(w)[1]["out"]) == str(source)]
        assert writers, f"{name} replays {source}, which no world job writes"
        for writer in writers:
            assert where(writer, parsed(writer)[1]["out"], "the log") == where(name, source, "the log")
            assert services()[name]["depends_on"][writer]["condition"] == "service_completed_successfully"


def test_every_service_builds_and_runs_the_one_image():
    images = {(services()[n].get("image"), str(services()[n].get("build"))) for n in STREAMREC_SERVICES}
    assert len(images) == 1, f"streamrec services use different images or builds: {images}"
    context = services()[STREAMREC_SERVICES[0]]["build"]
    context = context if isinstance(context, str) else context.get("context", ".")
    dockerfile = (ROOT / context / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    assert re.search(r"pip install -c requirements-lock\.txt", dockerfile), "the image must install with the lock as constraints"
    # the build context keeps what `pip install .` needs
    ignored = [line.strip() for line in (ROOT / context / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = pyproject["tool"]["setuptools"]
    includes = setuptools["packages"]["find"]["include"]
    packages = [p.name for p in ROOT.iterdir() if (p / "__init__.py").exists() and any(fnmatch.fnmatch(p.name, i) for i in includes)]
    needed = ["pyproject.toml", "requirements-lock.txt", pyproject["project"]["readme"], *packages,
              *(f"{pkg}/{pattern}" for pkg, patterns in setuptools.get("package-data", {}).items() for pattern in patterns)]
    for path in needed:
        dropped = [p for p in ignored if not p.startswith("!") and (fnmatch.fnmatch(path, p.lstrip("/"))
                   or any(fnmatch.fnmatch(str(parent), p.lstrip("/")) for parent in PurePosixPath(path).parents if str(parent) != "."))]
        assert not dropped, f".dockerignore drops {path} (by {dropped}), which the image build needs"


# -- the checkers catch what they are for ----------------------------------------------------------

def test_setting_names_are_checked_against_the_tree():
    assert setting_problem("STREAMREC_KAFKA__BOOTSTRAP_SERVERS") is None
    assert setting_problem("streamrec_serving__port") is None  # pydantic-settings reads names case-insensitively
    assert setting_problem("STREAMREC_LEARNER__MODEL__ENCODER__SOURCE") is None  # three levels down
    assert setting_problem("STREAMREC_POLICY__EXPLORATION__EPSILON") is None  # a dict setting takes any key
    assert setting_problem("STREAMREC_DATA_DIR") is None
    assert "did you mean 'bootstrap_servers'" in setting_problem("STREAMREC_KAFKA__BOOTSTRAP_SERVER")
    assert "has no setting 'datadir'" in setting_problem("STREAMREC_DATADIR")
    assert "the settings tree has no setting 'servng'" in setting_problem("STREAMREC_SERVNG__PORT")
    assert "serving.port is a single value" in setting_problem("STREAMREC_SERVING__PORT__NUMBER")
    assert "policy.train.hidden is a single value" in setting_problem("STREAMREC_POLICY__TRAIN__HIDDEN__0")
    assert "not a StreamRec variable" in setting_problem("KAFKA_BOOTSTRAP_SERVERS")


@pytest.mark.parametrize(("argv", "reason"), [
    (["serve", "--prot", "8000"], "No such option: --prot"),
    (["serve", "--port", "http"], "Invalid value for '--port'"),
    (["stream"], "`streamrec stream` needs a command, one of: worker"),
    (["learner"], "has no command 'learner'"),
    (["world", "generate", "--requests", "10"], "Missing option '--out'"),
    (["--confg", "x.yaml", "learn"], "No such option: --confg"),
])
def test_commands_are_checked_against_the_cli(argv, reason):
    with pytest.raises(NotACommand, match=re.escape(reason)):
        parse_cli(argv)


def test_a_valid_command_parses_to_its_parameters():
    command, params = parse_cli(["--config", "s.yaml", "replay", "log.jsonl", "--to-kafka", "--speed", "2.5"])
    assert command == ("replay",)
    assert (params["source"], params["to_kafka"], params["speed"]) == (Path("log.jsonl"), True, 2.5)


def test_a_broken_service_fails_the_checks(monkeypatch):
    """The same helpers on a deliberately broken copy of the serving service."""
    broken = {**services()["serving"], "command": ["streamrec", "serve", "--replica", "2"],
              "environment": {**environment(services()["serving"]), "STREAMREC_SERVING__PROT": "8000"}}
    monkeypatch.setitem(services(), "serving-broken", broken)
    with pytest.raises(NotACommand, match="No such option: --replica"):
        parse_cli(command_of(broken)[1:])
    assert "did you mean 'port'" in setting_problem("STREAMREC_SERVING__PROT")
    monkeypatch.setitem(broken, "volumes", ["feast:/data/feature_store"])
    assert on_volume("serving-broken", "/data/registry") is None
    assert on_volume("serving", "/data/registry/model/v1") == ("registry", PurePosixPath("model/v1"))


# -- the real tool, where it is installed ----------------------------------------------------------

def _compose_tool() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_config_accepts_the_file(tmp_path):
    tool = _compose_tool()
    if tool is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed; the checks above stand in for it")
    file = COMPOSE_FILE
    version = subprocess.run([*tool, "version", "--short"], capture_output=True, text=True, timeout=30).stdout.strip()
    if version.startswith("1."):  # Compose v1 (end of life) predates the top-level `name`; check the rest
        file = tmp_path / "docker-compose.yml"
        file.write_text(yaml.safe_dump({k: v for k, v in compose().items() if k != "name"}, sort_keys=False))
    profiles = sorted({p for s in services().values() for p in s.get("profiles") or []})
    for active in ([], profiles):
        args = [*tool, "--project-directory", str(ROOT), "-f", str(file)]
        for profile in active:
            args += ["--profile", profile]
        result = subprocess.run([*args, "config", "--quiet"], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert result.returncode == 0, f"{' '.join(args)} config --quiet (Compose {version}): {result.stderr}"
