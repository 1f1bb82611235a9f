"""Security (issue 8, item 5) on the real components.

- the serving API key: where it is needed and only there, what a refusal says, that it is never
  echoed, and that an empty key cannot be configured (``tests/test_serving_api.py::
  test_an_api_key_guards_recommendations`` has the basic missing/wrong/right check);
- Kafka SASL and SSL settings pass through: a real broker whose only other listener is SASL_SSL
  (SASL PLAIN, TLS with our own CA, client certificates required) is reached by every
  kafka-python client StreamRec opens (admin, producer, consumer, the CLI) and by the Faust
  app's credentials through Faust's own aiokafka transport mapping; wrong credentials fail with a
  message that says what to check, and an encrypted key without its password never prompts;
- the Redis password reaches Feast's Redis online store (a real redis-server with requirepass);
  a wrong or missing one is a FeatureStoreError that says which setting to fix
  (``tests/test_feature_store.py::test_redis_password_is_passed_through`` has the right password);
- no secret in logs: settings reprs and dumps, settings errors, the CLI, and a whole serving
  process on SASL_SSL Kafka and a password-protected Redis with an API key, with every logger at
  DEBUG: the SASL password, the key password, the Redis password and the API key never appear in
  the log records, stdout/stderr or HTTP answers.

The dependency audit is ``./dev audit`` (pip-audit against requirements-lock.txt); it needs the
network, so it is not a test here.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import os
import ssl
import time
import uuid
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from pydantic import ValidationError
from typer.testing import CliRunner

from feature_store.config import FeatureStoreSettings
from feature_store.store import FeatureStoreError, StreamingFeatureStore
from learner.registry import ModelRegistry
from policies.synthetic_world import SyntheticWorld, WorldConfig
from serving.app import API_KEY_HEADER, create_app
from serving.config import ServingSettings
from serving.service import RecommendationService
from serving.synthetic import publish_baseline
from streaming.config import KafkaSettings
from streaming.events import Click, Impression, encode_event
from streaming.features import FeatureUpdate
from streaming.kafka_io import EventConsumer, EventProducer, KafkaUnavailable, ensure_topics
from streaming.local_broker import BrokerError, LocalKafka, free_port
from streamrec.settings import Settings, SettingsError, load_settings
from tests.redis_server import LocalRedis, RedisServerError

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")

SASL_USER = "streamrec"
SASL_PASSWORD = "sasl-S3cret-7f2c9"
KEY_PASSWORD = "key-S3cret-91ab3"
REDIS_PASSWORD = "redis-S3cret-44de1"
API_KEY = "api-S3cret-c0ffee7"
SECRETS = (SASL_PASSWORD, KEY_PASSWORD, REDIS_PASSWORD, API_KEY)
T0 = 1_767_225_600_000


def assert_no_secret(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"a secret ({secret[:6]}...) appears in {where}"


def fail_or_skip(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


# -- the API key --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A registry with a tiny model and policy, and an applied SQLite feature store."""
    warnings.simplefilter("ignore")
    root = tmp_path_factory.mktemp("published")
    world = SyntheticWorld(WorldConfig(seed=2, n_users=20, n_items=30))
    registry = ModelRegistry(root / "registry")
    publish_baseline(registry, world)
    features = FeatureStoreSettings(data_dir=root / "features")
    with StreamingFeatureStore(features) as store:
        store.apply()
    return registry, features


@pytest.fixture(scope="module")
def keyed_client(published):
    registry, features = published
    service = RecommendationService(ServingSettings(api_key=API_KEY, candidates=10, seed=0), registry=registry,
                                    store=StreamingFeatureStore(features)).start()
    with TestClient(create_app(service)) as client:
        yield client
    service.stop()


GUARDED = [("post", "/recommend"), ("get", "/versions")]
OPEN = [("get", "/healthz"), ("get", "/readyz"), ("get", "/metrics")]
BODY = {"user_id": "u0001", "k": 3}


def call(client, method: str, path: str, headers: dict | None = None, params: dict | None = None):
    kwargs = {"headers": headers or {}, "params": params or {}}
    if method == "post":
        kwargs["json"] = BODY
    return getattr(client, method)(path, **kwargs)


@pytest.mark.parametrize("method, path", GUARDED)
def test_guarded_endpoints_refuse_every_wrong_key_with_a_clear_401(keyed_client, method, path):
    wrong = [
        {},  # no header
        {API_KEY_HEADER: ""},
        {API_KEY_HEADER: "wrong"},
        {API_KEY_HEADER: API_KEY.upper()},
        {API_KEY_HEADER: API_KEY[:-1]},
        {API_KEY_HEADER: API_KEY + "x"},
        {API_KEY_HEADER: API_KEY + "," + API_KEY},
        {"Authorization": f"Bearer {API_KEY}"},  # only X-API-Key counts
        {"X-Api-Token": API_KEY},
        {API_KEY_HEADER: "k" * 8000},
    ]
    for headers in wrong:
        response = call(keyed_client, method, path, headers)
        assert response.status_code == 401, (headers, response.status_code, response.text)
        assert response.json() == {"error": f"missing or wrong API key: send it in the {API_KEY_HEADER} header"}
        assert_no_secret(response.text + str(response.headers), "a refusal")
    # a non-ASCII header value (raw latin-1 bytes) is a refusal, not a server error
    response = keyed_client.request(method.upper(), path, headers=[(API_KEY_HEADER.encode(), b"\xff\xfe" + API_KEY.encode())],
                                    json=BODY if method == "post" else None)
    assert response.status_code == 401
    # nor does the key work anywhere but the header
    assert call(keyed_client, method, path, params={"api_key": API_KEY, API_KEY_HEADER: API_KEY}).status_code == 401


@pytest.mark.parametrize("method, path", GUARDED)
def test_the_right_key_opens_guarded_endpoints_whatever_the_header_case(keyed_client, method, path):
    for name in (API_KEY_HEADER, API_KEY_HEADER.lower(), API_KEY_HEADER.upper()):
        response = call(keyed_client, method, path, {name: API_KEY})
        assert response.status_code == 200, response.text
        assert_no_secret(response.text, f"{path}'s answer")


@pytest.mark.parametrize("method, path", OPEN)
def test_probes_and_metrics_need_no_key_and_show_none(keyed_client, method, path):
    response = call(keyed_client, method, path)
    assert response.status_code == 200, response.text
    assert_no_secret(response.text, f"{path}'s answer")


def test_the_key_is_checked_before_the_request_is_validated(keyed_client):
    # a bad body without the key is a 401, not a 422 that tells an outsider which fields are wrong
    response = keyed_client.post("/recommend", json={"user_id": "", "k": "many", "surprise": 1})
    assert response.status_code == 401
    with_key = keyed_client.post("/recommend", json={"user_id": "", "k": "many"}, headers={API_KEY_HEADER: API_KEY})
    assert with_key.status_code == 422 and "user_id" in with_key.text


@pytest.mark.parametrize("key", ["", " ", f" {API_KEY}", f"{API_KEY}\n"])
def test_an_empty_or_untransmittable_api_key_cannot_be_configured(key, monkeypatch):
    # an empty key would match a request that sends no header at all: every request would get in
    with pytest.raises(ValidationError, match="api_key is empty or has surrounding spaces"):
        ServingSettings(api_key=key)
    monkeypatch.setenv("STREAMREC_SERVING__API_KEY", key)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "serving.api_key" in str(info.value)


# -- Kafka SASL/SSL pass-through --------------------------------------------------------------------

def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA, a broker certificate for 127.0.0.1/localhost and a client certificate whose key is encrypted."""
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def pem(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    def issue(subject: str, key, issuer_key, issuer: x509.Name, extensions) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(issuer_key, hashes.SHA256())

    keys = [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3)]
    ca = issue("StreamRec test CA", keys[0], keys[0], name("StreamRec test CA"),
               [(x509.BasicConstraints(ca=True, path_length=None), True)])
    server = issue("localhost", keys[1], keys[0], ca.subject, [(x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)])
    client = issue("streamrec-client", keys[2], keys[0], ca.subject, [])
    folder.mkdir(parents=True, exist_ok=True)
    files = {"ca": folder / "ca.pem", "server": folder / "server.pem", "cert": folder / "client.crt",
             "key": folder / "client.key"}
    files["ca"].write_bytes(pem(ca))
    files["server"].write_bytes(keys[1].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()) + pem(server) + pem(ca))
    files["cert"].write_bytes(pem(client))
    files["key"].write_bytes(keys[2].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.BestAvailableEncryption(KEY_PASSWORD.encode())))
    return files


class SecureKafka(LocalKafka):
    """The local test broker plus a SASL_SSL listener: SASL PLAIN, TLS from our CA, client certificates required.

    Its PLAINTEXT listener stays for the broker's own use and readiness probe; the tests only
    ever connect to ``secure_bootstrap``.
    """

    def __init__(self, workdir: Path, certificates: dict[str, Path], users: dict[str, str]) -> None:
        super().__init__(workdir=workdir, heap="512m")
        self.secure_port = free_port()
        self.certificates, self.users = certificates, users

    @property
    def secure_bootstrap(self) -> str:
        return f"127.0.0.1:{self.secure_port}"

    def _write_config(self) -> Path:
        path = super()._write_config()
        props = dict(line.split("=", 1) for line in path.read_text().splitlines() if line)
        props["listeners"] += f",SASL_SSL://{self.secure_bootstrap}"
        props["advertised.listeners"] += f",SASL_SSL://{self.secure_bootstrap}"
        props["listener.security.protocol.map"] += ",SASL_SSL:SASL_SSL"
        props["sasl.enabled.mechanisms"] = "PLAIN"
        listener = "listener.name.sasl_ssl."
        props[listener + "plain.sasl.jaas.config"] = (
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            + " ".join(f'user_{user}="{password}"' for user, password in self.users.items()) + ";")
        props[listener + "ssl.keystore.type"] = "PEM"
        props[listener + "ssl.keystore.location"] = str(self.certificates["server"])
        props[listener + "ssl.truststore.type"] = "PEM"
        props[listener + "ssl.truststore.location"] = str(self.certificates["ca"])
        props[listener + "ssl.client.auth"] = "required"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        return path


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict[str, Path]:
    return make_certificates(tmp_path_factory.mktemp("certificates"))


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory, certificates):
    try:
        broker = SecureKafka(tmp_path_factory.mktemp("secure-kafka"), certificates, {SASL_USER: SASL_PASSWORD}).start()
    except BrokerError as exc:
        fail_or_skip(f"the SASL_SSL Kafka broker could not be started: {exc}")
    yield broker
    broker.remove()


def secure_settings(broker: SecureKafka, certificates: dict[str, Path], **overrides) -> KafkaSettings:
    """Settings as a user writes them (validated, like the environment's STREAMREC_KAFKA__*)."""
    values = {
        "bootstrap_servers": broker.secure_bootstrap, "topic_prefix": f"s{uuid.uuid4().hex[:8]}.", "partitions": 1,
        "security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_plain_username": SASL_USER,
        "sasl_plain_password": SASL_PASSWORD, "ssl_cafile": str(certificates["ca"]),
        "ssl_certfile": str(certificates["cert"]), "ssl_keyfile": str(certificates["key"]),
        "ssl_password": KEY_PASSWORD, "bootstrap_timeout_ms": 15_000, "linger_ms": 1,
    }
    return KafkaSettings.model_validate({**values, **overrides})


def consume(kafka: KafkaSettings, topic: str, n: int, timeout_s: float = 30.0) -> list:
    consumer = EventConsumer(kafka, [topic], group_id=f"g{uuid.uuid4().hex[:8]}")
    try:
        records, deadline = [], time.monotonic() + timeout_s
        while len(records) < n and time.monotonic() < deadline:
            records += consumer.poll(500)
        return records
    finally:
        consumer._consumer.close()


def test_sasl_and_ssl_settings_reach_every_kafka_python_client(secure_broker, certificates):
    kafka = secure_settings(secure_broker, certificates)
    created = ensure_topics(kafka)  # the admin client
    assert kafka.topic("clicks") in created
    clicks = [Click(event_time=T0 + n, user_id=f"u{n}", item_id="i1") for n in range(5)]
    with EventProducer(kafka) as producer:  # the producer
        for click in clicks:
            producer.send(click)
        producer.flush(30)
    records = consume(kafka, "clicks", 5)  # the consumer
    assert sorted(r.event.event_id for r in records) == sorted(c.event_id for c in clicks)


@pytest.mark.parametrize("wrong, hint", [
    ({"sasl_plain_password": "not-the-password"}, "SASL username and password"),
    ({"ssl_certfile": None, "ssl_keyfile": None, "ssl_password": None}, "SSL files"),  # the broker requires a client certificate
    ({"security_protocol": "SSL"}, "protocol"),  # TLS without the SASL login the listener expects
])
def test_wrong_credentials_fail_with_a_message_that_says_what_to_check(secure_broker, certificates, wrong, hint):
    kafka = secure_settings(secure_broker, certificates, bootstrap_timeout_ms=1500, **wrong)
    with pytest.raises(KafkaUnavailable) as info:
        with EventProducer(kafka) as producer:
            producer.send(Click(event_time=T0, user_id="u", item_id="i"))
            producer.flush(5)
    message = str(info.value)
    assert f"security_protocol={kafka.security_protocol}" in message and hint in message
    assert_no_secret(message, "the error")


def test_an_encrypted_key_without_its_password_fails_at_once_instead_of_prompting(certificates):
    kafka = KafkaSettings(security_protocol="SSL", ssl_cafile=str(certificates["ca"]),
                          ssl_certfile=str(certificates["cert"]), ssl_keyfile=str(certificates["key"]))
    options = kafka.client_options()
    assert options["ssl_password"] == ""  # with None, OpenSSL would ask on the terminal
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with pytest.raises(ssl.SSLError):
        context.load_cert_chain(options["ssl_certfile"], options["ssl_keyfile"], password=options["ssl_password"])
    from streaming.stream_app import broker_credentials

    with pytest.raises(ssl.SSLError):
        broker_credentials(kafka)
    with_password = kafka.model_copy(update={"ssl_password": KafkaSettings(ssl_password=KEY_PASSWORD).ssl_password})
    assert broker_credentials(with_password).context is not None


def test_the_faust_app_gets_the_same_credentials_and_they_work(secure_broker, certificates, tmp_path, caplog):
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaConnectionError
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    from streaming.stream_app import StreamWorker

    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="aiokafka")
    kafka = secure_settings(secure_broker, certificates)
    ensure_topics(kafka, ["clicks"])
    worker = StreamWorker(kafka, data_dir=str(tmp_path / "faust"))
    credentials = worker.app.conf.broker_credentials
    assert (credentials.username, credentials.password, credentials.mechanism.value) == (SASL_USER, SASL_PASSWORD, "PLAIN")
    assert credentials.ssl_context.verify_mode == ssl.CERT_REQUIRED and credentials.ssl_context.check_hostname
    assert_no_secret(repr(credentials), "the credentials' repr")
    auth = credentials_to_aiokafka_auth(credentials)  # exactly what Faust's aiokafka transport passes on
    assert auth["security_protocol"] == "SASL_SSL"
    click = Click(event_time=T0, user_id="faust-user", item_id="i1")

    async def send(options) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, request_timeout_ms=10_000, **options)
        try:
            await asyncio.wait_for(producer.start(), 20)
            await producer.send_and_wait(kafka.topic("clicks"), encode_event(click), key=b"faust-user")
        finally:
            await producer.stop()

    asyncio.run(send(auth))
    assert [r.event for r in consume(kafka, "clicks", 1)] == [click]
    wrong = credentials_to_aiokafka_auth(StreamWorker(
        secure_settings(secure_broker, certificates, sasl_plain_password="wrong"), data_dir=str(tmp_path / "f2")
    ).app.conf.broker_credentials)
    assert "SaslAuthenticate" in caplog.text  # aiokafka logged its requests at DEBUG, the SASL one included
    assert_no_secret(caplog.text, "aiokafka's DEBUG log")
    with pytest.raises(KafkaConnectionError):
        asyncio.run(send(wrong))
    assert "SaslAuthenticationFailed" in caplog.text  # what aiokafka logs for the refused login


def test_the_cli_reads_sasl_and_ssl_from_the_environment_and_prints_no_secret(secure_broker, certificates, caplog):
    from streamrec.cli import app

    kafka = secure_settings(secure_broker, certificates)
    env = {
        "STREAMREC_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "STREAMREC_KAFKA__TOPIC_PREFIX": kafka.topic_prefix,
        "STREAMREC_KAFKA__PARTITIONS": "1",
        "STREAMREC_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "STREAMREC_KAFKA__SASL_MECHANISM": "PLAIN",
        "STREAMREC_KAFKA__SASL_PLAIN_USERNAME": SASL_USER,
        "STREAMREC_KAFKA__SASL_PLAIN_PASSWORD": SASL_PASSWORD,
        "STREAMREC_KAFKA__SSL_CAFILE": str(certificates["ca"]),
        "STREAMREC_KAFKA__SSL_CERTFILE": str(certificates["cert"]),
        "STREAMREC_KAFKA__SSL_KEYFILE": str(certificates["key"]),
        "STREAMREC_KAFKA__SSL_PASSWORD": KEY_PASSWORD,
        "STREAMREC_FEATURE_STORE__REDIS_PASSWORD": REDIS_PASSWORD,
        "STREAMREC_SERVING__API_KEY": API_KEY,
        "STREAMREC_LOG_LEVEL": "DEBUG",
    }
    caplog.set_level(logging.DEBUG)
    kafka_level = logging.getLogger("kafka").level  # the CLI quiets kafka-python's logger; put it back after
    runner = CliRunner()
    try:
        created = runner.invoke(app, ["topics", "create"], env=env)
    finally:
        logging.getLogger("kafka").setLevel(kafka_level)
    assert created.exit_code == 0, created.output
    assert f"{kafka.topic('clicks')}\tcreated" in created.stdout
    listed = runner.invoke(app, ["topics", "list"], env=env)
    assert listed.exit_code == 0 and f"{kafka.topic('clicks')}\t1" in listed.stdout
    refused = runner.invoke(app, ["topics", "create"], env={**env, "STREAMREC_KAFKA__SASL_PLAIN_PASSWORD": "wrong",
                                                             "STREAMREC_KAFKA__BOOTSTRAP_TIMEOUT_MS": "1500"})
    assert refused.exit_code == 1 and "SASL username and password" in refused.output
    invalid = runner.invoke(app, ["schema"], env={**env, "STREAMREC_SERVING__MAX_K": "0",
                                                  "STREAMREC_FEATURE_STORE__REDIS_PASSWORD": REDIS_PASSWORD + ",x"})
    assert invalid.exit_code == 2 and "serving" in invalid.output and "redis_password" in invalid.output
    for result in (created, listed, refused, invalid):
        assert_no_secret(result.output, "the CLI's output")
    assert_no_secret(caplog.text, "the CLI's logs")


# -- Redis password ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def redis_with_password(tmp_path_factory):
    if os.environ.get("REDIS_URL"):
        pytest.skip("REDIS_URL is set; these tests start their own password-protected redis-server")
    try:
        server = LocalRedis(workdir=tmp_path_factory.mktemp("redis"), extra_args=["--requirepass", REDIS_PASSWORD]).start()
    except RedisServerError as exc:
        fail_or_skip(f"could not start redis-server: {exc}")
    yield server
    server.stop()


def redis_store(tmp: Path, server: LocalRedis, password: str | None) -> StreamingFeatureStore:
    settings = FeatureStoreSettings(data_dir=tmp / f"features-{uuid.uuid4().hex[:6]}", online_store="redis",
                                    redis_connection_string=server.connection_string, redis_password=password,
                                    project=f"t{uuid.uuid4().hex[:10]}")
    store = StreamingFeatureStore(settings)
    store.apply()
    return store


def test_a_wrong_redis_password_is_a_clear_error_and_the_right_one_works(redis_with_password, tmp_path):
    update = FeatureUpdate("item_catalog", "i1", T0, {"title": "Lamp"})
    wrong = redis_store(tmp_path, redis_with_password, "not-the-password")
    with pytest.raises(FeatureStoreError) as info:  # after redis-py's own retries (~6 s)
        wrong.push([update])
    message = str(info.value)
    assert redis_with_password.connection_string in message and "a password that it refused" in message
    assert "STREAMREC_FEATURE_STORE__REDIS_PASSWORD" in message
    assert_no_secret(message, "the error")
    wrong.close()
    right = redis_store(tmp_path, redis_with_password, REDIS_PASSWORD)
    right.push([update])
    assert right.online_features(item_ids=["i1"], views=["item_catalog"])["item"]["title"] == ["Lamp"]
    right.close()


# -- no secret in logs -----------------------------------------------------------------------------------

def test_settings_show_no_secret_in_reprs_dumps_or_errors(monkeypatch):
    settings = Settings(
        kafka={"sasl_plain_password": SASL_PASSWORD, "ssl_password": KEY_PASSWORD},
        feature_store={"redis_password": REDIS_PASSWORD}, serving={"api_key": API_KEY},
    )
    for text in (repr(settings), str(settings), str(settings.model_dump()), settings.model_dump_json(),
                 repr(settings.kafka), repr(settings.serving), repr(settings.feature_store)):
        assert_no_secret(text, "the settings' text")
    # a validation error echoes the section's input in pydantic's own message; StreamRec's does not
    for name, value in [("STREAMREC_KAFKA__SASL_PLAIN_PASSWORD", SASL_PASSWORD), ("STREAMREC_KAFKA__SSL_PASSWORD", KEY_PASSWORD),
                        ("STREAMREC_SERVING__API_KEY", API_KEY)]:
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("STREAMREC_SERVING__MAX_K", "0")  # the serving section's model check fails
    monkeypatch.setenv("STREAMREC_KAFKA__SECURITY_PROTOCOL", "SASL_TLS")  # and a kafka field
    monkeypatch.setenv("STREAMREC_FEATURE_STORE__REDIS_PASSWORD", REDIS_PASSWORD + ",")  # and the secret itself
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert "serving.max_k" in message and "kafka.security_protocol" in message and "redis_password" in message
    assert_no_secret(message, "the settings error")
    config = Path(os.environ.get("TMPDIR", "/tmp")) / f"streamrec-{uuid.uuid4().hex}.yaml"
    config.write_text(f"serving:\n  api_key: {API_KEY}\n  default_k: 500\n")
    monkeypatch.delenv("STREAMREC_SERVING__MAX_K")
    monkeypatch.delenv("STREAMREC_KAFKA__SECURITY_PROTOCOL")
    monkeypatch.delenv("STREAMREC_FEATURE_STORE__REDIS_PASSWORD")
    try:
        with pytest.raises(SettingsError) as info:
            load_settings(config)
        assert "default_k 500 is larger than max_k" in str(info.value)
        assert_no_secret(str(info.value), "the settings file error")
    finally:
        config.unlink()


def test_kafka_client_logs_mask_secrets_even_as_escaped_bytes(caplog):
    tricky = "p\u00e4'ss\\wrd"  # non-ASCII, a quote and a backslash: escaped in a bytes repr
    KafkaSettings(sasl_plain_password=tricky, security_protocol="SASL_PLAINTEXT").client_options()
    caplog.set_level(logging.DEBUG, logger="kafka.protocol.parser")
    logger = logging.getLogger("kafka.protocol.parser")
    logger.debug("Send: %r", bytearray(b"\x00user\x00" + tricky.encode()))
    logger.debug("Send: %r", bytearray(b'\x00"user"\x00' + tricky.encode()))  # the other quoting of the repr
    logger.debug("auth %s for %s", tricky, "user")
    logger.debug("auth %r", tricky)
    assert caplog.text.count("**********") == 4, caplog.text
    for form in (tricky, "ss\\\\wrd", "ss\\wrd"):
        assert form not in caplog.text, caplog.text


def test_a_secure_serving_process_logs_no_secret(published, secure_broker, certificates, redis_with_password,
                                                 tmp_path, caplog, capfd):
    """Serving from settings on SASL_SSL Kafka and a password-protected Redis, with an API key, every
    logger at DEBUG: it starts, serves, logs its impressions to the secure broker, swaps in a version
    announced there, and no secret shows anywhere."""
    import shutil

    from policies.export import greedy_policy, publish_policy

    shutil.copytree(published[0].root, tmp_path / "registry")
    registry = ModelRegistry(tmp_path / "registry")
    kafka = secure_settings(secure_broker, certificates)
    ensure_topics(kafka)
    settings = Settings(
        kafka=kafka.model_dump(),
        feature_store={"data_dir": str(tmp_path / "features"), "online_store": "redis",
                       "redis_connection_string": redis_with_password.connection_string,
                       "redis_password": REDIS_PASSWORD, "project": f"t{uuid.uuid4().hex[:10]}"},
        serving={"api_key": API_KEY, "registry_dir": str(registry.root), "candidates": 10, "seed": 0,
                 "registry_poll_s": 3600},
        data_dir=str(tmp_path),
    )
    assert settings.kafka.sasl_plain_password.get_secret_value() == SASL_PASSWORD  # the secrets survived the dump
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="kafka")
    service = RecommendationService.from_settings(settings).start()
    try:
        with TestClient(create_app(service)) as client:
            assert client.get("/readyz").status_code == 200
            response = client.post("/recommend", json={"user_id": "u0001", "k": 3, "request_id": "secure-1"},
                                   headers={API_KEY_HEADER: API_KEY})
            assert response.status_code == 200, response.text
            assert client.post("/recommend", json={"user_id": "u0001"}).status_code == 401
            for path in ("/versions", "/metrics", "/readyz"):
                assert_no_secret(client.get(path, headers={API_KEY_HEADER: API_KEY}).text, path)
        logged = [r.event for r in consume(kafka, "impressions", 3)]
        assert all(isinstance(e, Impression) and e.request_id == "secure-1" for e in logged) and len(logged) == 3
        new_policy = publish_policy(registry, greedy_policy(exploration={"kind": "epsilon", "epsilon": 0.3}))
        with EventProducer(kafka) as producer:  # announced on model-updates, heard by the listener over SASL_SSL
            producer.send(registry.announcement(new_policy))
        deadline = time.monotonic() + 30
        while service.swapper.serving_version("policy") != new_policy.version and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.swapper.serving_version("policy") == new_policy.version  # registry_poll_s is an hour: the listener
    finally:
        service.stop()
    out, err = capfd.readouterr()
    assert_no_secret(out + err, "stdout/stderr")
    assert_no_secret(caplog.text, "the log records")
    assert_no_secret("\n".join(str(r.args) for r in caplog.records), "the log records' arguments")
    assert "SaslAuthenticateRequest" in caplog.text, "kafka-python's DEBUG request log (the leak path) was captured"
