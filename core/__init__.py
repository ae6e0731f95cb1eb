"""Shared machinery of every channels-gateways gateway: config, layer, envelope, service, CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("channels-gateways")
except PackageNotFoundError:  # running from a checkout that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
