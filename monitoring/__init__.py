"""Grafana dashboard generator (dashboard.py) and the Prometheus rules and example config (prometheus/)."""
