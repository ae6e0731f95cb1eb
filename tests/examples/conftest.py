"""Fixtures for the example projects' tests: headless Chromium (shared with the http_ws tests)."""

from tests.gateways.http_ws.conftest import browser

__all__ = ["browser"]
