"""Prefect flows and the `dolphin` CLI."""
