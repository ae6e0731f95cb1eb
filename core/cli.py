"""Command-line plumbing shared by every binary (DESIGN §7).

Exit codes: 0 clean stop, 2 usage or configuration error (before any connection), 3 could not
start (port taken, transport refused), 1 crash.

Layer precedence: ``--layer`` beats the YAML ``layer:`` key, which beats ``GATEWAYS_LAYER``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from core import __version__
from core.config import ConfigError, GatewayConfig, load_config, peek_gateway
from core.health import HealthServer
from core.layers import (
    LayerPathError,
    close_layer,
    import_object,
    is_memory_layer,
    resolve_layer,
)
from core.logs import describe_layer, redact, setup_logging
from core.retry import StartupError, describe_error, describe_tasks
from core.service import Gateway
from core.types import ChannelLayer

__all__ = [
    "EXIT_CONFIG",
    "EXIT_CRASH",
    "EXIT_OK",
    "EXIT_START",
    "gateway_main",
    "install_layer",
    "run_main",
    "serve",
]

EXIT_OK, EXIT_CRASH, EXIT_CONFIG, EXIT_START = 0, 1, 2, 3

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]

log = logging.getLogger("gateway")

GatewayClass = type[Gateway[Any]]


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--layer", help="layer path: redis://…, memory://, django[:ALIAS], mod:attr"
    )
    parser.add_argument(
        "--log-level",
        default=None,
        type=str.upper,
        choices=LOG_LEVELS,
        help="log level (default INFO, or GATEWAYS_LOG_LEVEL)",
    )
    parser.add_argument(
        "--check-config", action="store_true", help="validate the configuration and exit 0 or 2"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def _log_level(args: argparse.Namespace) -> str:
    """``--log-level``, else ``GATEWAYS_LOG_LEVEL``, else INFO; a bad value is a UsageError."""
    if args.log_level:
        return str(args.log_level)
    value = os.environ.get("GATEWAYS_LOG_LEVEL", "INFO").strip().upper() or "INFO"
    if value not in LOG_LEVELS:
        raise UsageError(
            f"GATEWAYS_LOG_LEVEL={value.lower()!r} is not a log level: use {', '.join(LOG_LEVELS)}"
        )
    return value


def _cwd_on_path() -> None:
    """Import ``--app`` / settings / layer paths from the working directory, as ``manage.py``
    and uvicorn do (a console script's ``sys.path[0]`` is its bin directory)."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


def _layer_path(cli_value: str | None, configs: Sequence[GatewayConfig]) -> str:
    if cli_value:
        return cli_value
    paths = {c.layer for c in configs if c.layer}
    if len(paths) > 1:
        raise UsageError("the configuration files name different layers; pass --layer to pick one")
    if paths:
        return paths.pop()
    env = os.environ.get("GATEWAYS_LAYER")
    if env:
        return env
    raise UsageError("no layer: pass --layer, set layer: in the YAML or set GATEWAYS_LAYER")


def _import(path: str, what: str) -> Any:
    try:
        return import_object(path)
    except ValueError as exc:
        raise UsageError(f"invalid {what} {path!r}: {exc}") from None
    except Exception as exc:  # the module itself fails (NameError in asgi.py, settings, …)
        raise UsageError(f"invalid {what} {path!r}: {describe_error(exc)}") from None


def _django_application() -> Any | None:
    module = os.environ.get("DJANGO_SETTINGS_MODULE")
    if not module:
        return None
    import django
    from django.conf import settings

    try:
        django.setup()
    except Exception as exc:
        raise UsageError(f"DJANGO_SETTINGS_MODULE={module!r}: {describe_error(exc)}") from None
    path = getattr(settings, "ASGI_APPLICATION", None)
    if not path:
        raise UsageError("DJANGO_SETTINGS_MODULE is set but ASGI_APPLICATION is not")
    module, _, attr = str(path).rpartition(".")
    return _import(f"{module}:{attr}", "ASGI_APPLICATION")


def install_layer(layer: ChannelLayer) -> None:
    """Make Django consumers in this process use ``layer`` (needed for ``memory://``)."""
    try:
        from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers
    except ImportError:  # pragma: no cover - channels is a dependency
        return
    with contextlib.suppress(Exception):  # no Django settings: consumers will not ask
        channel_layers.backends[DEFAULT_CHANNEL_LAYER] = layer


async def serve(
    gateways: Sequence[Gateway[Any]],
    *,
    application: Any | None = None,
    worker_channels: Sequence[str] = (),
) -> int:
    """Run gateways (and, with ``application``, a channels worker) until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    health_servers = [
        HealthServer(gw.config.health.host, gw.config.health.port, [gw.ready_reasons], [gw.status])
        for gw in gateways
        if gw.config.health is not None
    ]
    tasks: dict[asyncio.Task[Any], str] = {}
    exit_code = EXIT_OK
    stuck: asyncio.TimerHandle | None = None
    try:
        for server in health_servers:
            try:
                await server.start()
            except OSError as exc:
                log.error("could not start health server on port %d: %s", server.port, exc)
                return EXIT_START
        for gw in gateways:
            tasks[asyncio.create_task(gw.run(), name=gw.name)] = gw.name
        if application is not None:
            from core.worker import ConsumerWorker

            worker = ConsumerWorker(application, list(worker_channels), gateways[0].layer)
            tasks[asyncio.create_task(worker.arun(), name="worker")] = "worker"
            log.info("running consumers on %s", ", ".join(worker_channels))
        stop_task = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([*tasks, stop_task], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is stop_task:
                continue
            failure = task.exception()
            if isinstance(failure, StartupError):
                log.error("%s could not start: %s", tasks[task], failure)
                exit_code = EXIT_START
            elif failure is not None:
                log.error("%s crashed: %s", tasks[task], describe_error(failure), exc_info=failure)
                exit_code = EXIT_CRASH
            else:
                log.error("%s exited unexpectedly", tasks[task])
                exit_code = EXIT_CRASH
        if stop_task in done:
            log.info("signal received: draining")
        stop_task.cancel()
        stuck = _exit_if_stuck(gateways)
        for gw in gateways:
            gw.stop()
        gateway_tasks = [t for t, name in tasks.items() if name != "worker"]
        results = await asyncio.gather(*gateway_tasks, return_exceptions=True)
        for task, result in zip(gateway_tasks, results, strict=True):
            if isinstance(result, BaseException) and task not in done:
                log.error("%s failed while stopping: %s", tasks[task], describe_error(result))
                exit_code = exit_code or EXIT_CRASH
        for task, name in tasks.items():
            if name == "worker":
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if gateways:
            await close_layer(gateways[0].layer, log)
        return exit_code
    finally:
        if stuck is not None:  # the stop ended: a loop that goes on must not be killed later
            stuck.cancel()
            faulthandler.cancel_dump_traceback_later()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        for server in health_servers:
            await server.stop()


#: seconds past the longest shutdown_grace after which a stop that has not ended is a bug
STOP_MARGIN = 15.0


def _exit_if_stuck(gateways: Sequence[Gateway[Any]]) -> asyncio.TimerHandle:
    """Make a stop that hangs (a bug) end by itself, with the evidence.

    After every gateway's ``shutdown_grace`` plus :data:`STOP_MARGIN`, the stack of every
    asyncio task still running is logged and the process exits with status 1, instead of
    waiting for a SIGKILL that leaves nothing to go on. Should the event loop itself be stuck,
    ``faulthandler`` writes every thread's stack a few seconds later and exits the same way.
    The caller cancels both (the handle returned, and faulthandler's) once the stop is done.
    """
    grace = max((gw.config.shutdown_grace for gw in gateways), default=0.0)
    faulthandler.dump_traceback_later(grace + STOP_MARGIN + 5, exit=True)
    return asyncio.get_running_loop().call_later(grace + STOP_MARGIN, _stuck, grace + STOP_MARGIN)


def _stuck(after: float) -> None:
    tasks = [t for t in asyncio.all_tasks() if not t.done()]
    log.error(
        "stop not done after %.1f s; %d task(s) left, exiting with 1:\n%s",
        after,
        len(tasks),
        describe_tasks(tasks),
    )
    logging.shutdown()
    os._exit(EXIT_CRASH)


def _prepare(
    specs: Sequence[tuple[str, GatewayClass]],
    args: argparse.Namespace,
    *,
    allow_memory: bool,
) -> tuple[list[Gateway[Any]], Any]:
    configs: list[tuple[GatewayConfig, GatewayClass]] = []
    errors: list[str] = []
    for path, cls in specs:
        try:
            configs.append((load_config(path, cls.config_model), cls))
        except ConfigError as exc:
            errors.append(str(exc))
    if errors:
        raise UsageError("\n".join(errors))
    names = [c.name for c, _ in configs]
    if len(set(names)) != len(names):
        raise UsageError(f"integration names must be unique, got {names}")
    path = _layer_path(args.layer, [c for c, _ in configs])
    layer = resolve_layer(path)
    if is_memory_layer(layer) and not allow_memory:
        raise UsageError(
            f"layer {describe_layer(path)!r} only works when the consumers run in the same "
            "process: use `gateways run FILE --app module:application`, or a Redis layer"
        )
    log.info("layer %s", describe_layer(path))
    return [cls(config, layer) for config, cls in configs], layer


def _serve_application(gateways: Sequence[Gateway[Any]], application: Any) -> None:
    """Hand ``application`` to gateways that serve one for their unbridged paths (http_ws)."""
    for gw in gateways:
        serve = getattr(gw, "serve_application", None)
        if serve is not None:
            serve(application)


def _execute(run: Any) -> int:
    try:
        return int(asyncio.run(run))
    except KeyboardInterrupt:  # pragma: no cover - signal handlers are installed first
        return EXIT_OK


def gateway_main(gateway_cls: GatewayClass, argv: Sequence[str] | None = None) -> int:
    """``main()`` of a single-gateway binary such as ``gateway-email``."""
    parser = argparse.ArgumentParser(
        prog=f"gateway-{gateway_cls.protocol.replace('_', '-')}",
        description=f"Bridge {gateway_cls.protocol} to a Django Channels layer.",
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="integration YAML")
    serves_app = hasattr(gateway_cls, "serve_application")
    if serves_app:
        parser.add_argument(
            "--app",
            help="ASGI application (module:attr) for every path the gateway does not bridge",
        )
    _common_arguments(parser)
    args = parser.parse_args(argv)
    try:
        setup_logging(_log_level(args))
        _cwd_on_path()  # for package.module:attr layer paths
        gateways, _ = _prepare([(args.config, gateway_cls)], args, allow_memory=args.check_config)
        if serves_app and args.app:
            _serve_application(gateways, _import(args.app, "--app"))
    except (UsageError, LayerPathError) as exc:
        print(redact(f"{parser.prog}: {exc}"), file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        print(f"{args.config}: ok")
        return EXIT_OK
    return _execute(serve(gateways))


def run_main(
    registry: Mapping[str, str],
    argv: Sequence[str] | None = None,
    others: Mapping[str, str] | None = None,
) -> int:
    """``gateways run FILE… [--app module:application]``: several integrations in one process.

    ``registry`` maps the YAML ``gateway:`` value to the ``module:Class`` of its gateway;
    ``others`` names the subcommands the caller handles itself (listed in ``--help`` only).
    """
    parser = argparse.ArgumentParser(prog="gateways", description="Run channels-gateways.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run integrations (and optionally consumers) in one process")
    for name, text in (others or {}).items():
        sub.add_parser(name, help=text)
    run.add_argument("files", nargs="+", metavar="FILE", help="integration YAML files")
    run.add_argument(
        "--app",
        help="ASGI application (module:attr) whose consumers run here too; "
        "default: ASGI_APPLICATION when DJANGO_SETTINGS_MODULE is set",
    )
    run.add_argument(
        "--no-consumers",
        action="store_true",
        help="run only the gateways, even when DJANGO_SETTINGS_MODULE is set",
    )
    run.add_argument(
        "--channel",
        action="append",
        default=[],
        help="extra channel for the in-process consumers (repeatable)",
    )
    _common_arguments(run)
    args = parser.parse_args(argv)
    try:
        level = _log_level(args)
        setup_logging(level)
        _cwd_on_path()
        specs: list[tuple[str, GatewayClass]] = []
        for path in args.files:
            kind = peek_gateway(path)
            if kind not in registry:
                known = ", ".join(sorted(registry))
                raise UsageError(f"{path}: gateway: unknown gateway {kind!r} (known: {known})")
            specs.append((path, _import(registry[kind], "gateway")))
        application = None
        if args.app:
            application = _import(args.app, "--app")
        elif not (args.check_config or args.no_consumers):
            application = _django_application()
            setup_logging(level)  # django.setup() replaced the root handlers with LOGGING's
        gateways, layer = _prepare(
            specs, args, allow_memory=application is not None or args.check_config
        )
    except (UsageError, LayerPathError, ConfigError) as exc:
        print(redact(f"gateways: {exc}"), file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        for path in args.files:
            print(f"{path}: ok")
        return EXIT_OK
    channels: list[str] = list(args.channel)
    if application is not None:
        _serve_application(gateways, application)
        install_layer(layer)
        for gw in gateways:
            channels += gw.config.consumer_channels()
            # http_ws: route channels without a consumer host the application (issue 28)
            adapt = getattr(gw, "worker_application", None)
            if adapt is not None:
                application = adapt(application)
    return _execute(serve(gateways, application=application, worker_channels=sorted(set(channels))))
