"""One settings tree: defaults, a YAML/TOML file, STREAMREC_* overrides, security pass-through."""

from __future__ import annotations

import pytest

from streamrec.settings import SettingsError, load_settings


def test_file_then_environment_then_arguments(tmp_path, monkeypatch):
    config = tmp_path / "streamrec.yaml"
    config.write_text("kafka:\n  partitions: 3\n  topic_prefix: shop.\n  group_id: from-file\n")
    monkeypatch.setenv("STREAMREC_KAFKA__PARTITIONS", "12")
    settings = load_settings(config)
    assert settings.kafka.partitions == 12  # environment beats the file
    assert settings.kafka.topic_prefix == "shop."  # the file beats the defaults
    assert settings.kafka.topic("clicks") == "shop.clicks"
    assert settings.kafka.bootstrap_servers == "localhost:9092"


def test_toml_file_and_config_variable(tmp_path, monkeypatch):
    config = tmp_path / "streamrec.toml"
    config.write_text('[kafka]\nbootstrap_servers = "k1:9092,k2:9092"\n')
    monkeypatch.setenv("STREAMREC_CONFIG", str(config))
    assert load_settings().kafka.client_options()["bootstrap_servers"] == ["k1:9092", "k2:9092"]


def test_sasl_ssl_settings_pass_through_to_every_client(monkeypatch):
    monkeypatch.setenv("STREAMREC_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("STREAMREC_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("STREAMREC_KAFKA__SASL_PLAIN_USERNAME", "svc-streamrec")
    monkeypatch.setenv("STREAMREC_KAFKA__SASL_PLAIN_PASSWORD", "hunter2")
    monkeypatch.setenv("STREAMREC_KAFKA__SSL_CAFILE", "/etc/ssl/kafka-ca.pem")
    kafka = load_settings().kafka
    for options in (kafka.client_options(), kafka.producer_options(), kafka.consumer_options()):
        assert options["security_protocol"] == "SASL_SSL"
        assert options["sasl_mechanism"] == "SCRAM-SHA-512"
        assert options["sasl_plain_username"] == "svc-streamrec"
        assert options["sasl_plain_password"] == "hunter2"
        assert options["ssl_cafile"] == "/etc/ssl/kafka-ca.pem"
    assert "hunter2" not in repr(kafka) and "hunter2" not in str(load_settings())


def test_producer_and_consumer_defaults_give_at_least_once():
    kafka = load_settings().kafka
    producer = kafka.producer_options()
    assert producer["acks"] == "all" and producer["retries"] > 0 and producer["enable_idempotence"]
    assert kafka.consumer_options()["enable_auto_commit"] is False


def test_bad_settings_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "missing.yaml")
    config = tmp_path / "bad.yaml"
    config.write_text("kafka:\n  partitions: 0\n")
    with pytest.raises(SettingsError, match="partitions"):
        load_settings(config)
    monkeypatch.setenv("STREAMREC_KAFKA__SECURITY_PROTOCOL", "TLS")
    with pytest.raises(SettingsError, match="security_protocol"):
        load_settings()


def test_a_misspelled_environment_variable_is_an_error_not_silently_ignored(monkeypatch):
    from streamrec.settings import SettingsError, load_settings

    monkeypatch.setenv("STREAMREC_SERVING__PROT", "9000")
    with pytest.raises(SettingsError, match="STREAMREC_SERVING__PROT .did you mean STREAMREC_SERVING__PORT"):
        load_settings()
    monkeypatch.delenv("STREAMREC_SERVING__PROT")
    monkeypatch.setenv("STREAMREC_SERVING__PORT", "9000")
    assert load_settings().serving.port == 9000
