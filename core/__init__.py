"""Shared machinery of every channels-gateways gateway (DESIGN §2): the one page to read first.

A gateway ``gateways/<proto>/`` uses these pieces (each module's docstring is its reference):

====================  ===========================================================================
``core.service``      ``Gateway``: hooks ``open`` / ``drain`` / ``close`` / ``readiness``;
                      ``publish() -> bool``, the one push-back contract; commands registered
                      with ``@handles("<proto>.<command>")``; ``EventBuffer`` for transports
                      without pushback (a bad event is logged, counted, skipped).
``core.client``       ``ReconnectingClient`` for client-side transports (IRC, Slack Socket Mode,
                      MQTT): fatal-vs-transient first attempt, jittered backoff reset after a
                      stable connection, idle watchdog, ``<proto>.connect`` / ``.disconnect``,
                      readiness; its states are a table.
``core.pacer``        ``Pacer``: async token bucket per key (burst, rate, bounded queue).
``core.redis``        ``layer_redis()``: a gateway's own keys beside a ``redis://`` layer.
``core.config``       ``GatewayConfig`` + ``Section``: the YAML, validated all at once.
``core.envelope``     event / command / result messages; ``CommandError``.
``core.types``        ``ChannelLayer``: the layer as a typed ``Protocol``.
``core.clock``        ``Clock``: injectable time (``core.testing.ManualClock`` in tests).
``core.cli``          ``gateway_main``: the whole ``cli.py`` of a gateway is one call.
``core.layers``       layer paths (``redis://``, ``memory://``, ``django``, ``mod:attr``).
``core.metrics``      Prometheus series, labelled by integration; ``core.health`` serves them.
``core.testing``      real servers (Redis, Mosquitto, ngircd, InspIRCd + Atheme), certificates,
                      ``GatewayProcess``, ``run_gateway``, ``command``, ``until``, ``metric``.
====================  ===========================================================================

Inside a gateway: ``config.py`` (its section), ``translate.py`` (pure), ``connection.py`` (the
only I/O), ``gateway.py`` (``<Proto>Gateway``), ``cli.py``; tests/test_import_rules.py keeps it so.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("channels-gateways")
except PackageNotFoundError:  # running from a checkout that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
