"""`taskctl metrics`: the daemon's Prometheus metrics, as /metrics serves them."""

import sys

from taskctl.cli.common import JsonOption, client, emit_json


def metrics(json_: JsonOption = False) -> None:
    """Print the metrics in Prometheus text format; with --json, one object that maps each
    metric family to its samples."""
    text = client().open("GET", "/metrics").read().decode()
    if not json_:
        sys.stdout.write(text)
        return
    from prometheus_client.parser import text_string_to_metric_families

    emit_json(
        {
            family.name: [
                {"labels": s.labels, "value": s.value, "name": s.name} for s in family.samples
            ]
            for family in text_string_to_metric_families(text)
        }
    )
