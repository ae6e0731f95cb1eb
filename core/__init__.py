"""Shared machinery of every channels-gateways gateway: the one page a gateway's author reads.

A gateway is the package ``gateways/<proto>/``, always with the same rooms (DESIGN §2;
tests/test_import_rules.py keeps them apart):

=================  ============================================================================
``config.py``      ``<Proto>Config(Section)``, the ``<proto>:`` section, and
                   ``<Proto>GatewayConfig(GatewayConfig)`` holding it (:mod:`core.config`).
``translate.py``   pure functions: transport event → event keys, command → transport action.
``connection.py``  the only module that touches the transport library.
``gateway.py``     ``<Proto>Gateway(Gateway[<Proto>GatewayConfig])``: wires the other three.
``cli.py``         ``def main(argv=None) -> int: return gateway_main(<Proto>Gateway, argv)``.
``README.md``      the message spec: every YAML key with its default, every event and command.
=================  ============================================================================

``gateway.py`` in outline (``gateways/irc/gateway.py`` is the full client-side example,
``gateways/email/gateway.py`` the server-side one)::

    class IrcGateway(Gateway[IrcGatewayConfig]):
        protocol = "irc"                      # message types are "irc.<event>"
        config_model = IrcGatewayConfig

        def __init__(self, config: IrcGatewayConfig, layer: ChannelLayer) -> None:
            super().__init__(config, layer)
            self.settings = config.irc        # its section: `settings` in every gateway
            self.buffer = EventBuffer(self, self.settings.buffer)  # IRC cannot push back
            self.pacer = Pacer(rate, burst, metrics=self.metrics)  # flood control
            self.client = IrcConnection(self, ..., listener=self, events=self.buffer)

        async def open(self) -> None:         # raise StartupError (exit 3) to refuse to start
            self.buffer.start()
            await self.client.start()         # first attempt: refused → StartupError
        def readiness(self) -> list[str]:     # [] = ready; else what /readyz says
            return self.client.readiness()
        async def drain(self) -> None: ...    # finish in-flight work (within shutdown_grace)
        async def close(self) -> None: ...    # close the transport

        @handles("irc.send")                  # the only way a command reaches a method
        async def handle_send(self, command: Command) -> dict[str, Any]:
            await self.pacer.wait(target)     # a full queue raises PacerFull: ok false
            ...                               # raise CommandError("why") for ok: false
            return {"lines": 2}               # extra keys of the irc.result

        def client_connected(self, details: Mapping[str, Any]) -> None: ...  # re-join
        def client_disconnected(self, reason: str) -> None: ...

Inbound, ``self.event("receive", **keys)`` builds the envelope and ``await self.publish(event,
timeout=…)`` hands it to the layer, retrying while the layer is full or down. ``publish()``
returns ``False`` when the deadline passed: the one push-back contract, which each transport
turns into its own (SMTP 451, a withheld PUBACK, HTTP 503). A transport that cannot push back
puts events in an ``EventBuffer`` (bounded; every drop counted and logged). An event no
layer can take (over 1 MB, not msgpack-safe) raises ``EventRefused``, logged and counted once.
With several events waiting (a broker's backlog), ``await self.publish_many(pairs)`` hands them
over in order, one Redis round trip for all on ``core.streams``, and says how many are in.
Stop background tasks with ``cancel_and_wait(*tasks)``: it cancels again until they are done.

Which piece for what (each module's docstring is its reference):

====================  ===========================================================================
``core.service``      ``Gateway`` (above), ``handles``, ``EventBuffer``, ``EventRefused``.
``core.retry``        ``LAYER_ERRORS`` (what is an outage), ``Backoff``, ``StartupError``,
                      ``send_command`` (layer send, retried), ``cancel_and_wait``,
                      ``describe_error``; shared with the consumer side, so it never imports
                      ``core.service``.
``core.client``       ``ReconnectingClient``: subclass it in ``connection.py`` for a transport
                      that dials out (IRC, Slack Socket Mode, MQTT): hooks ``_connect`` /
                      ``_wait_lost`` / ``_disconnect`` (``_probe``, ``_abort``, ``_hang_up``);
                      it owns fatal-vs-transient first attempts, backoff, the idle watchdog,
                      ``restart()``, ``<proto>.connect`` / ``.disconnect`` and readiness. Its
                      states are a table.
``core.pacer``        ``Pacer``: async token bucket per key (burst, rate, bounded queue).
``core.redis``        ``layer_redis()``: a gateway's own keys beside a Redis layer (plain, Sentinel,
                      Cluster; ``WAIT`` under ``durability: replicated``).
``core.clock``        ``Clock`` / ``LOOP_CLOCK``: time as a dependency (pacer, schedules).
``core.config``       ``GatewayConfig``, ``Section`` (``secret_files`` for ``<key>_file``),
                      ``ReconnectConfig``; the field descriptions are the YAML reference.
``core.envelope``     ``Command``, ``CommandError``, event / result messages, the 1 MB limit.
``core.types``        ``ChannelLayer``: the layer as a typed ``Protocol`` (never ``Any``).
``core.cli``          ``gateway_main``: the whole ``cli.py``.
``core.layers``       layer paths (``redis://``, ``memory://``, ``django``, ``mod:attr``).
``core.streams``      the ``redis://`` layer: Redis Streams, batched, acknowledged, redelivered.
``core.worker``       ``ConsumerWorker``: acknowledges after the handler, retries, dead letters.
``core.metrics``      ``self.metrics``: Prometheus series by integration (``core.health``).
====================  ===========================================================================

Where to register a gateway (a seventh ``gateways/<proto>/``; tests/gateways/test_registration.py
derives the gateways from the folders with a ``gateway.py`` and fails until each point is done):

1. ``gateways/__init__.py`` ``GATEWAYS``: ``"<proto>": "gateways.<proto>.gateway:<Proto>Gateway"``
   (the YAML ``gateway:`` value; ``gateways run``, ``manage.py rungateway`` and the generated
   docs/configuration.md read it: run ``python -m gateways.config_reference``).
2. ``gateways/entry.py``: ``BINARIES["gateway-<proto>"] = "gateways.<proto>.cli"`` and a
   ``def <proto>() -> int: return run("gateway-<proto>")`` (the shadowed-``core`` check runs first;
   ``_`` in ``<proto>`` is ``-`` in a binary's name).
3. ``pyproject.toml`` ``[project.scripts]``: ``gateway-<proto> = "gateways.entry:<proto>"``.
4. ``tests/test_import_rules.py`` ``TRANSPORT_IO``: the I/O parts of its transport library, so
   only its ``connection.py`` may import them.
5. ``README.md``: a row of the gateway table, with its binary and a link to its own README.md.
6. Its rooms (the table above, plus ``consumers.py`` with a ``Commands`` subclass, listed in
   tests/gateways/test_consumers.py ``COMMANDS``) and ``tests/gateways/<proto>/``.

Tests use :mod:`core.testing` (real servers on free ports; fixtures in tests/conftest.py)::

    async with run_gateway(IrcGateway(config, layer)) as gateway:      # in this process
        result = await command(layer, "ops.send", {"type": "irc.send", ...})
        event = await receive(layer, "ops", "irc.receive", channel="#ops")
        await until(lambda: metric("gateway_dropped_total", gateway="ops") == 1)
    process = GatewayProcess.from_config(tmp_path, config).start()     # the real binary
    project = example_project(tmp_path, redis.url)   # tests.support: examples/, fresh DB
    project.gateway("irc.yaml").start(); project.worker("ops-irc")

and ``ManualClock`` where time matters; ``RedisServer``, ``MosquittoServer``,
``NgircdServer``, ``InspircdServer``, ``SmtpSink`` and ``DjangoWorker`` for the far sides.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("channels-gateways")
except PackageNotFoundError:  # running from a checkout that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
