"""Fixtures and helpers shared by the unit, integration and end-to-end tests."""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the repository
