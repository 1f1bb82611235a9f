"""A real single-node Kafka (KRaft) broker on loopback, from Apache Kafka's jars on Maven Central.

For tests and local development on machines without Docker: the jars are fetched once per
machine with Maven into ``~/.cache/streamrec/kafka-<version>``, a broker+controller node is
formatted in a fresh log directory, started on free ports, awaited until a metadata request
succeeds, and stopped cleanly. ``restart`` keeps its ports and data, for broker-outage tests.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

KAFKA_VERSION = "4.1.1"
LOG4J_VERSION = "2.24.3"

_POM = f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>io.streamrec</groupId>
  <artifactId>local-kafka</artifactId>
  <version>{KAFKA_VERSION}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{KAFKA_VERSION}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>{LOG4J_VERSION}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>{LOG4J_VERSION}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-api</artifactId><version>{LOG4J_VERSION}</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>1.7.36</version></dependency>
  </dependencies>
</project>
"""

_LOG4J = """appender.c.type=Console
appender.c.name=OUT
appender.c.layout.type=PatternLayout
appender.c.layout.pattern=[%d] %p %m (%c)%n
rootLogger.level=INFO
rootLogger.appenderRef.o.ref=OUT
logger.kafka.name=kafka
logger.kafka.level=INFO
logger.state.name=state.change.logger
logger.state.level=WARN
"""


class BrokerError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("STREAMREC_CACHE", Path.home() / ".cache" / "streamrec"))


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise BrokerError(f"`{tool}` is not on PATH; the local Kafka broker needs Java 17+ and Maven")
    return path


def fetch_kafka_jars(version: str = KAFKA_VERSION) -> Path:
    """Download the broker's jars with Maven once per machine; return the libs directory."""
    home = cache_dir() / f"kafka-{version}"
    libs = home / "libs"
    done = home / ".complete"
    if done.exists():
        return libs
    mvn = _require("mvn")
    home.mkdir(parents=True, exist_ok=True)
    (home / "pom.xml").write_text(_POM)
    staging = Path(tempfile.mkdtemp(prefix="libs-", dir=home))
    result = subprocess.run(
        [mvn, "-B", "-q", "-f", str(home / "pom.xml"), "dependency:copy-dependencies",
         f"-DoutputDirectory={staging}", "-DincludeScope=runtime"],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise BrokerError(f"fetching Kafka {version} jars with Maven failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    if libs.exists():
        shutil.rmtree(libs)
    staging.rename(libs)
    done.write_text(version)
    return libs


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the broker's child process: ask Linux to SIGTERM it when the process that started it dies,
    so a killed test session or ``streamrec dev kafka`` never leaves an orphan broker behind."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: stop() and the atexit hook still clean up


class LocalKafka:
    """One KRaft node (broker + controller) on 127.0.0.1 with its own data directory."""

    def __init__(self, workdir: Path | None = None, port: int | None = None, heap: str = "1g") -> None:
        self.libs = fetch_kafka_jars()
        self.java = _require("java")
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="streamrec-kafka-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.controller_port = free_port()
        self.heap = heap
        self.log_path = self.workdir / "broker.log"
        self._process: subprocess.Popen | None = None
        self._formatted = False

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _classpath(self) -> str:
        return f"{self.libs}/*"

    def _write_config(self) -> Path:
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.workdir / "data"),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "5",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
        }
        path = self.workdir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.workdir / "log4j2.properties").write_text(_LOG4J)
        return path

    def _format(self, config: Path) -> None:
        cluster_id = subprocess.run(
            [self.java, "-cp", self._classpath(), "kafka.tools.StorageTool", "random-uuid"],
            capture_output=True, text=True, check=True,
        ).stdout.strip().splitlines()[-1]
        result = subprocess.run(
            [self.java, "-cp", self._classpath(), "kafka.tools.StorageTool", "format", "--standalone",
             "-t", cluster_id, "-c", str(config)],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise BrokerError(f"formatting Kafka storage failed:\n{result.stdout}{result.stderr}")
        self._formatted = True

    def start(self, timeout_s: float = 90.0) -> "LocalKafka":
        config = self._write_config()
        if not self._formatted:
            self._format(config)
        log_file = open(self.log_path, "ab")
        self._process = subprocess.Popen(
            [self.java, f"-Xms256m", f"-Xmx{self.heap}", "-XX:+UseG1GC", "-XX:TieredStopAtLevel=1",
             f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
             "-cp", self._classpath(), "kafka.Kafka", str(config)],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
        )
        log_file.close()
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        """Ready when a metadata request through kafka-python succeeds."""
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        deadline = time.monotonic() + timeout_s
        while True:
            if self._process is not None and self._process.poll() is not None:
                raise BrokerError(f"Kafka exited with {self._process.returncode}; log tail:\n{self.log_tail()}")
            with socket.socket() as probe:  # cheap check first: the port is open
                probe.settimeout(1)
                listening = probe.connect_ex(("127.0.0.1", self.port)) == 0
            if not listening:
                if time.monotonic() > deadline:
                    raise BrokerError(f"Kafka did not open {self.bootstrap} in {timeout_s}s; log tail:\n{self.log_tail()}")
                time.sleep(0.2)
                continue
            try:
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
                try:
                    admin.list_topics()
                    return
                finally:
                    admin.close()
            except KafkaError:
                if time.monotonic() > deadline:
                    raise BrokerError(f"Kafka did not answer on {self.bootstrap} in {timeout_s}s; log tail:\n{self.log_tail()}")
                time.sleep(0.25)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no broker log)"

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM and wait for a clean shutdown; SIGKILL if it does not come."""
        if self._process is None or self._process.poll() is not None:
            return
        os.killpg(self._process.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()

    def restart(self, timeout_s: float = 90.0) -> None:
        """Stop and start again on the same ports with the same data."""
        self.stop()
        self.start(timeout_s)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "LocalKafka":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.remove()
