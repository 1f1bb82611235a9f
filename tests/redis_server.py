"""A real redis-server for tests and benchmarks: a throwaway process on a free loopback port.

``REDIS_URL`` (``redis://host:port[/db]`` or ``host:port``) points the tests at a running server
instead. Without one and without a ``redis-server`` binary, the Redis tests are skipped, or fail
under ``CI=true``. Tests that share a server keep apart by Feast project (every key carries it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import redis

START_TIMEOUT_S = 20.0


class RedisServerError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def connection_string(url: str) -> str:
    """Feast's ``host:port[,db=N]`` form of a ``redis://`` URL (or of ``host:port`` itself)."""
    if "://" not in url:
        return url
    parsed = urlparse(url)
    if parsed.password:
        raise RedisServerError("REDIS_URL carries a password; the tests expect an unauthenticated server")
    db = parsed.path.strip("/")
    return f"{parsed.hostname}:{parsed.port or 6379}" + (f",db={db}" if db else "")


class LocalRedis:
    """``redis-server`` on 127.0.0.1 with persistence off, in its own working folder.

    >>> with LocalRedis() as server:  # doctest: +SKIP
    ...     server.connection_string
    '127.0.0.1:38211'
    """

    def __init__(self, workdir: str | Path | None = None, binary: str | None = None,
                 extra_args: list[str] | None = None) -> None:
        self.extra_args = list(extra_args or [])  # e.g. ["--requirepass", "secret"]
        self.binary = binary or shutil.which("redis-server")
        if self.binary is None:
            raise RedisServerError("redis-server is not on PATH (Debian: apt-get install redis-server)")
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="streamrec-redis-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def password(self) -> str | None:
        args = self.extra_args
        return args[args.index("--requirepass") + 1] if "--requirepass" in args else None

    @property
    def connection_string(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, attempts: int = 3) -> "LocalRedis":
        """Start on a free port and return once it answers PING; another port if this one was taken."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once()
            except RedisServerError:
                if attempt == attempts or "Address already in use" not in self._log_tail():
                    raise
        raise AssertionError("unreachable")

    def _start_once(self) -> "LocalRedis":
        self.port = _free_port()
        with (self.workdir / "redis.log").open("wb") as log:
            self.process = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.workdir), "--daemonize", "no", *self.extra_args],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
            )
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                             socket_connect_timeout=0.5, socket_timeout=0.5)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while True:
                if self.process.poll() is not None:
                    raise RedisServerError(f"redis-server exited with {self.process.returncode}: {self._log_tail()}")
                try:
                    if client.ping():
                        return self
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self._terminate()
                    raise RedisServerError(f"redis-server did not answer PING within {START_TIMEOUT_S:.0f} s: "
                                           f"{self._log_tail()}")
                time.sleep(0.02)  # poll interval while it binds its port
        finally:
            client.close()

    def _terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: redis-server exits at once with persistence off
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def stop(self) -> None:
        self._terminate()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _log_tail(self) -> str:
        try:
            return (self.workdir / "redis.log").read_text(errors="replace")[-2000:].strip()
        except OSError:
            return "(no log)"

    def __enter__(self) -> "LocalRedis":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """Feast's connection string (``host:port``) of a running Redis for this test session."""
    if os.environ.get("REDIS_URL"):
        yield connection_string(os.environ["REDIS_URL"])
        return
    try:
        server = LocalRedis(workdir=tmp_path_factory.mktemp("redis")).start()
    except RedisServerError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the Redis server the tests need could not be started: {exc}", pytrace=False)
        pytest.skip(f"no Redis server: {exc}")
    yield server.connection_string
    server.stop()
