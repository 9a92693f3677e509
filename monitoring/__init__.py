"""Metrics every package records into, the exporter that serves them, and the dashboards and alert
rules that read them (dashboards/, alerts.yml, prometheus.yml, grafana/).

Depends on no other package of the project: the trainer and the cluster call into it.
"""

from monitoring.metrics import LABELS, TrainingMetrics
from monitoring.exporter import MetricsExporter

__all__ = ["LABELS", "MetricsExporter", "TrainingMetrics"]
