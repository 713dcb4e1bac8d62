#!/usr/bin/env python3
"""Writes charts/order-operator/files/dashboard.json, the Grafana dashboard of one
pipeline (variable `pipeline` = "namespace/name", the label the operator's metrics
carry and the chart's PodMonitor gives the workers' metrics). Run after editing;
a test checks that every metric it uses exists on a real Prometheus."""
import json, pathlib

P = 'pipeline="$pipeline"'

def panel(i, title, targets, unit="short", x=0, y=0, w=12, h=8, desc=""):
    return {
        "id": i, "type": "timeseries", "title": title, "description": desc,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [{"refId": chr(65 + n), "expr": e, "legendFormat": l,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for n, (e, l) in enumerate(targets)],
    }

panels = [
    panel(1, "Orders/s by outcome", [
        (f'sum by (outcome) (rate(orderworker_messages_total{{{P}}}[1m]))', "{{outcome}}")],
        "ops", 0, 0, desc="Input messages finished per second: processed, rejected, dead_lettered, duplicate, nak."),
    panel(2, "Lag and the scaler's target", [
        (f'orderoperator_pipeline_lag{{{P}}}', "lag"),
        (f'orderoperator_pipeline_target_lag_per_replica{{{P}}} * clamp_min(orderoperator_pipeline_workers_available{{{P}}}, 1)', "target x available workers")],
        "short", 12, 0, desc="Orders not yet processed (pending + ack pending); above the target line the lag alert's window starts."),
    panel(3, "Dead letters", [
        (f'orderoperator_pipeline_dead_letters{{{P}}}', "in the dead-letter stream"),
        (f'sum by (class) (increase(orderworker_dead_letters_total{{{P}}}[5m]))', "new in 5m: {{class}}")],
        "short", 0, 8),
    panel(4, "Workers: available vs desired", [
        (f'orderoperator_pipeline_workers_desired{{{P}}}', "desired"),
        (f'orderoperator_pipeline_workers_available{{{P}}}', "available"),
        (f'orderoperator_pipeline_paused{{{P}}}', "paused")],
        "short", 12, 8),
    panel(5, "Processing latency", [
        (f'histogram_quantile(0.5, sum by (le) (rate(orderworker_processing_duration_seconds_bucket{{{P}}}[5m])))', "p50"),
        (f'histogram_quantile(0.99, sum by (le) (rate(orderworker_processing_duration_seconds_bucket{{{P}}}[5m])))', "p99")],
        "s", 0, 16, desc="From receiving a message to its final ack/nak/term, per worker pod, aggregated."),
    panel(6, "Operator: reconcile errors and not-ready reasons", [
        ('sum by (kind) (rate(orderoperator_reconcile_failures_total[5m]))', "failed: {{kind}}"),
        ('sum by (reason) (rate(orderoperator_reconcile_not_ready_total[5m]))', "not ready: {{reason}}"),
        ('sum(orderoperator_leader)', "replicas leading")],
        "short", 12, 16),
]

dashboard = {
    "uid": "orderpipeline", "title": "OrderPipeline", "tags": ["orderpipeline", "nats"],
    "schemaVersion": 39, "version": 1, "editable": True, "refresh": "30s",
    "time": {"from": "now-1h", "to": "now"},
    "templating": {"list": [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"},
        {"name": "pipeline", "type": "query", "label": "Pipeline (namespace/name)",
         "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "query": {"query": "label_values(orderoperator_pipeline_lag, pipeline)", "refId": "pipeline"},
         "definition": "label_values(orderoperator_pipeline_lag, pipeline)", "refresh": 2},
    ]},
    "panels": panels,
}
out = pathlib.Path(__file__).resolve().parent.parent / "charts/order-operator/files/dashboard.json"
out.write_text(json.dumps(dashboard, indent=2) + "\n")
print(out)
