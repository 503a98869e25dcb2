"""The Prometheus endpoint of a training job, scraped over real HTTP."""

from __future__ import annotations

import math
import socket
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from trainer.job.telemetry import TrainingTelemetry


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_gauges_are_scraped_over_http():
    registry = CollectorRegistry()
    with TrainingTelemetry(0, registry=registry) as telemetry:
        assert isinstance(telemetry.port, int) and telemetry.port > 0
        telemetry.update(phase="head", epoch=1, step=10, loss=1.5, images_per_second=250.0)
        telemetry.update(phase="finetune", epoch=2, step=40, loss=0.75, val_accuracy=0.875)
        samples = _scrape(telemetry.port)
    assert samples[("trainer_phase", (("phase", "finetune"),))] == 1
    assert samples[("trainer_phase", (("phase", "head"),))] == 0
    assert samples[("trainer_epoch", ())] == 2
    assert samples[("trainer_step", ())] == 40
    assert samples[("trainer_train_loss", ())] == 0.75
    assert samples[("trainer_val_accuracy_ratio", ())] == 0.875
    assert samples[("trainer_images_per_second", ())] == 250.0  # kept from the first update
    assert samples[("trainer_last_update_timestamp_seconds", ())] > 1.6e9
    # the gauges went into the registry we passed, not the process-global one
    assert registry.get_sample_value("trainer_epoch") == 2


def test_close_stops_serving_and_frees_the_port():
    telemetry = TrainingTelemetry(0)
    port = telemetry.port
    assert port is not None
    telemetry.close()
    telemetry.close()  # idempotent
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_nan_loss_is_exported_not_dropped():
    with TrainingTelemetry(0) as telemetry:
        telemetry.update(loss=math.nan)
        assert telemetry.port is not None
        assert math.isnan(_scrape(telemetry.port)[("trainer_train_loss", ())])


def test_disabled_when_port_is_none():
    telemetry = TrainingTelemetry(None)
    telemetry.update(phase="head", epoch=1, loss=2.0)
    assert telemetry.port is None
    assert telemetry.registry.get_sample_value("trainer_epoch") is None
    telemetry.close()


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="metrics port"):
        TrainingTelemetry(70000)
    with pytest.raises(ValueError, match="metrics port"):
        TrainingTelemetry(-1)
    with TrainingTelemetry(0) as telemetry:
        with pytest.raises(ValueError, match="val_accuracy"):
            telemetry.update(val_accuracy=87.5)
        with pytest.raises(ValueError, match="epoch"):
            telemetry.update(epoch="one")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="phase"):
            telemetry.update(phase="")


def test_port_in_use_is_an_os_error():
    with TrainingTelemetry(0) as first, pytest.raises(OSError):
        TrainingTelemetry(first.port)
