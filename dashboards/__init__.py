"""Grafana dashboards, datasources and alert rules for RackTwin, generated as code.

``python -m dashboards.generate`` (``make dashboards``) writes everything into ``provisioning/grafana/``.
"""
