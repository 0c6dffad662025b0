"""``pypline-agent``: serve multi_proc stages to remote pipelines; make keys; check agents.

A thin edge: parse the options, build a frozen ``AgentConfig``, run. Exit statuses:

    0  success (serve: drained cleanly; ping: the agent is healthy)
    1  a runtime failure (ping/status: no answer; serve: crashed or stopped by a 2nd signal)
    2  usage error (click)
    3  configuration error (missing or bad keys, refused non-loopback bind, cannot bind)
    4  ping/status: the agent answered but is unhealthy (draining, version mismatch, refused)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 3
EXIT_UNHEALTHY = 4

DEFAULT_BIND = "tcp://127.0.0.1:5555"


class _Failed(click.ClickException):
    exit_code = EXIT_FAILED


class _ConfigError(click.ClickException):
    exit_code = EXIT_CONFIG


class _Unhealthy(click.ClickException):
    exit_code = EXIT_UNHEALTHY


def _Exit(message: str, code: int) -> click.ClickException:
    """A domain error, shown as ``Error: message``, exiting with ``code``."""
    cls = {EXIT_CONFIG: _ConfigError, EXIT_UNHEALTHY: _Unhealthy}.get(code, _Failed)
    return cls(message)


def _endpoint(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An endpoint argument or option, checked and completed (``HOST:PORT`` -> ``tcp://HOST:PORT``)."""
    if value is None:
        return None
    from pypline.lowlevel import normalize_endpoint

    try:
        if param.name == "bind" and value.endswith(":*"):  # bind to a free port: check the rest
            return normalize_endpoint(value[:-2] + ":1")[:-2] + ":*"
        return normalize_endpoint(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pypline-async", prog_name="pypline-agent")
def main() -> None:
    """Run multi_proc pipeline stages for remote pypline clients.

    \b
    On each worker host:   pypline-agent serve --bind tcp://0.0.0.0:5555 --keys ~/.pypline-keys
    On the client:         PYPLINE_AGENTS=tcp://host-a:5555,tcp://host-b:5555 \\
                           PYPLINE_KEYS=~/.pypline-keys python my_pipeline.py

    Create the keys once with `pypline-agent keygen DIR` and copy DIR to every host.
    """


@main.command()
@click.option(
    "--bind",
    default=DEFAULT_BIND,
    callback=_endpoint,
    show_default=True,
    metavar="ENDPOINT",
    help="ZeroMQ endpoint to listen on. A non-loopback address needs --keys (or --insecure). "
    "tcp://127.0.0.1:* picks a free port (printed in the ready line).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Worker processes per stage (at most; a stage never gets more than its num_workers). [default: CPU count]",
)
@click.option(
    "--keys",
    "keys_dir",
    type=click.Path(file_okay=False),
    default=None,
    metavar="DIR",
    help="CURVE key directory from `keygen`: uses DIR/agent.key_secret and admits every client public key DIR/*.key.",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Allow a non-loopback bind without keys. Anyone who can "
    "reach the port can run code as this user. Only on a network you fully trust.",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    metavar="S",
    help="On SIGTERM, seconds running items get to finish before they are handed back to their "
    "clients as lost (re-dispatched elsewhere).",
)
@click.option(
    "--backend",
    type=click.Choice(["process", "asyncio"]),
    default="process",
    show_default=True,
    help="Where stage functions run: supervised worker processes (crash isolation, timeouts kill), "
    "or threads/tasks inside the agent.",
)
@click.option(
    "--max-message",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    metavar="MIB",
    help="Largest message accepted (MiB); a peer sending more is disconnected.",
)
@click.option(
    "--max-memory",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    metavar="MIB",
    help="Memory budget for received tasks (MiB), all clients together: the credit the agent grants "
    "keeps the items it holds under it (give or take one per stage).",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
    help="Logging verbosity (stderr).",
)
@click.option(
    "--metrics",
    "metrics_addr",
    default=None,
    metavar="HOST:PORT",
    help="Serve the agent's numbers for Prometheus at http://HOST:PORT/metrics (read-only, no "
    "authentication: counts and stage names only). Port 0 picks a free one (printed in the ready line).",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="text: one readable line per record. json: one JSON object per line (time, level, "
    "logger, pid, message, and the traceback if any), for log collectors.",
)
def serve(
    bind: str,
    workers: int | None,
    keys_dir: str | None,
    insecure: bool,
    drain_timeout: float,
    backend: str,
    max_message: int,
    max_memory: int,
    log_level: str,
    log_format: str,
    metrics_addr: str | None,
) -> None:
    """Serve multi_proc stages until SIGTERM (then drain and exit 0)."""
    from .security import KeyError_, load_server_keys
    from .server import Agent, AgentConfig, ConfigError

    _setup_logging(log_level, log_format)
    keys = None
    if keys_dir is not None:
        try:
            keys = load_server_keys(keys_dir)
        except KeyError_ as exc:
            raise _Exit(str(exc), EXIT_CONFIG) from None
        import zmq

        if not zmq.has("curve"):
            raise _Exit("this libzmq was built without CURVE support; --keys cannot work", EXIT_CONFIG)
    metrics = None
    if metrics_addr is not None:
        from .metrics import parse_address

        try:
            metrics = parse_address(metrics_addr)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--metrics") from None
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            from .metrics import INSTALL_HINT

            raise _Exit(INSTALL_HINT, EXIT_CONFIG) from None
    config = AgentConfig(
        bind=bind,
        workers=workers or os.cpu_count() or 1,
        keys=keys,
        insecure=insecure,
        drain_timeout=drain_timeout,
        backend=backend,
        max_msg=max_message * 1024 * 1024,
        max_memory=max_memory * 1024 * 1024,
        metrics=metrics,
    )
    try:
        agent = Agent(config)
    except ConfigError as exc:
        raise _Exit(str(exc), EXIT_CONFIG) from None
    from .tuning import tune_malloc

    if tune_malloc():
        logging.getLogger("pypline.agent").debug("malloc tuned for large payloads (see pypline.worker_agent.tuning)")

    def ready(a: Agent) -> None:
        click.echo(
            f"pypline-agent ready endpoint={a.endpoint} instance={a.instance} workers={a.config.workers} "
            f"backend={a.backend_name} secure={'yes' if keys else 'no'} pid={os.getpid()}"
            + (f" metrics={a.metrics.url}" if a.metrics is not None else "")
        )
        sys.stdout.flush()

    try:
        status = asyncio.run(agent.serve(ready))
    except ConfigError as exc:
        raise _Exit(str(exc), EXIT_CONFIG) from None
    sys.exit(status)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace existing key files.")
def keygen(directory: str, force: bool) -> None:
    """Write an agent and a client key pair into DIRECTORY, the client admitted: for an agent
    and its clients on ONE host. Across hosts, give each host its own pair: see `keys`.

    \b
    DIRECTORY/agent.key, agent.key_secret    used by `serve --keys DIRECTORY`
    DIRECTORY/client.key, client.key_secret  used by clients: configure(keys=DIRECTORY) or PYPLINE_KEYS
    """
    from pypline.backends.wire.keys import KeyError_
    from pypline.backends.wire.keys import keygen as make

    try:
        written = make(directory, force=force)
    except KeyError_ as exc:
        raise _Exit(str(exc), EXIT_CONFIG) from None
    for p in written:
        click.echo(f"wrote {p}")
    click.echo(f"start the agent with: pypline-agent serve --keys {directory}")
    click.echo(f"point clients on this host at it with: PYPLINE_KEYS={directory}")


@main.group()
def keys() -> None:
    """Key pairs per host: an agent admits the clients it lists, a client pins each agent's key.

    \b
    on each agent host:   pypline-agent keys agent /etc/pypline/keys
    on each client host:  pypline-agent keys client ~/.pypline-keys
    admit a client:       copy its client.key to the agent host, then
                          pypline-agent keys allow /etc/pypline/keys client.key alice
    revoke it:            pypline-agent keys revoke /etc/pypline/keys alice
    trust an agent:       copy its agent.key to the client host, then
                          pypline-agent keys trust ~/.pypline-keys tcp://host-a:5555 agent.key
    Secret keys (*.key_secret) never leave the host they were made on.
    """


def _keys_call(fn: Callable[[], Any]) -> Any:
    from pypline.backends.wire.keys import KeyError_

    try:
        return fn()
    except KeyError_ as exc:
        raise _Exit(str(exc), EXIT_CONFIG) from None


@keys.command("agent")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace an existing pair.")
def keys_agent(directory: str, force: bool) -> None:
    """Make this agent host's key pair in DIRECTORY (and an empty DIRECTORY/clients/)."""
    from pypline.backends.wire.keys import AGENT_NAME, keygen_pair

    for p in _keys_call(lambda: keygen_pair(directory, AGENT_NAME, force=force)):
        click.echo(f"wrote {p}")
    click.echo(f"give {directory}/agent.key (public) to the clients; admit them with: pypline-agent keys allow")


@keys.command("client")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace an existing pair.")
def keys_client(directory: str, force: bool) -> None:
    """Make this client host's key pair in DIRECTORY."""
    from pypline.backends.wire.keys import CLIENT_NAME, keygen_pair

    for p in _keys_call(lambda: keygen_pair(directory, CLIENT_NAME, force=force)):
        click.echo(f"wrote {p}")
    click.echo(f"give {directory}/client.key (public) to each agent's admin; pin agents with: pypline-agent keys trust")


@keys.command("allow")
@click.argument("agent_dir", type=click.Path(file_okay=False))
@click.argument("client_key", type=click.Path(dir_okay=False))
@click.argument("name")
def keys_allow(agent_dir: str, client_key: str, name: str) -> None:
    """Admit the client whose public key file is CLIENT_KEY, as NAME (a running agent sees it at once)."""
    from pypline.backends.wire.keys import allow_client

    click.echo(f"wrote {_keys_call(lambda: allow_client(agent_dir, client_key, name))}")


@keys.command("revoke")
@click.argument("agent_dir", type=click.Path(file_okay=False))
@click.argument("name")
def keys_revoke(agent_dir: str, name: str) -> None:
    """Stop admitting client NAME: new connections are refused, and its sessions end at their next message."""
    from pypline.backends.wire.keys import revoke_client

    click.echo(f"removed {_keys_call(lambda: revoke_client(agent_dir, name))}")


@keys.command("trust")
@click.argument("client_dir", type=click.Path(file_okay=False))
@click.argument("endpoint")
@click.argument("agent_key", type=click.Path(dir_okay=False))
def keys_trust(client_dir: str, endpoint: str, agent_key: str) -> None:
    """Pin the agent at ENDPOINT to the public key in AGENT_KEY (known_agents); a changed key is refused."""
    from pypline.backends.wire.keys import trust_agent

    click.echo(f"pinned {endpoint} in {_keys_call(lambda: trust_agent(client_dir, endpoint, agent_key))}")


def _probe(endpoint: str, keys_dir: str | None, timeout: float, detail: bool) -> Any:
    from .probe import ProbeError, run_probe
    from .security import KeyError_

    try:
        return run_probe(endpoint, keys=keys_dir, timeout=timeout, detail=detail)
    except KeyError_ as exc:
        raise _Exit(str(exc), EXIT_CONFIG) from None
    except ProbeError as exc:
        raise _Exit(str(exc), EXIT_UNHEALTHY if exc.unhealthy else EXIT_FAILED) from None


_keys_option = click.option(
    "--keys",
    "keys_dir",
    type=click.Path(file_okay=False),
    default=None,
    metavar="DIR",
    envvar="PYPLINE_KEYS",
    help="Client keys (as for configure(keys=...)). [default: $PYPLINE_KEYS]",
)
_timeout_option = click.option(
    "--timeout",
    type=click.FloatRange(min=0.01),
    default=3.0,
    show_default=True,
    metavar="S",
    help="Seconds to wait for an answer.",
)


@main.command()
@click.argument("endpoint", callback=_endpoint)
@_keys_option
@_timeout_option
def ping(endpoint: str, keys_dir: str | None, timeout: float) -> None:
    """Check the agent at ENDPOINT: version, workers, free capacity.

    Exit status 0 when it answered and is healthy, 1 when it did not answer,
    4 when it answered but is draining or incompatible.
    """
    r = _probe(endpoint, keys_dir, timeout, detail=False)
    from pypline.backends.wire.protocol import describe_versions

    h, p = r.hello, r.pong
    click.echo(
        f"{endpoint}: pypline-agent on {h.get('host', '?')}, {describe_versions(h)}; "
        f"workers {p['workers']}, free {p['capacity']}, backend {h['backend']}, "
        f"{'DRAINING, ' if p['draining'] else ''}instance {p['instance'][:12]}, {r.rtt_ms:.1f} ms"
    )
    if not r.healthy:
        raise _Exit(f"{endpoint} is draining", EXIT_UNHEALTHY)


@main.command()
@click.argument("endpoint", callback=_endpoint)
@_keys_option
@_timeout_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
def status(endpoint: str, keys_dir: str | None, timeout: float, as_json: bool) -> None:
    """Show the agent's sessions, their stages, workers and credits."""
    r = _probe(endpoint, keys_dir, timeout, detail=True)
    st = r.status
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    from pypline.backends.wire.protocol import describe_versions

    click.echo(f"agent {st['endpoint']} on {st['host']} (pid {st['pid']}), instance {st['instance'][:12]}")
    click.echo(
        f"  {describe_versions(st['versions'])}, backend {st['backend']}, "
        f"{'CURVE' if st['secure'] else 'no authentication'}{', DRAINING' if st['draining'] else ''}"
    )
    click.echo(
        f"  workers {st['workers']}, free {st['free']}, tasks held {st.get('held_bytes', 0) / 2**20:.1f} MiB "
        f"of {st.get('max_memory', 0) / 2**20:.0f} MiB, sessions {len(st['sessions'])}, "
        f"warm executors {st.get('warm_executors', 0)} (reused {st.get('warm_reused', 0)} times)"
    )
    c = st["counters"]
    click.echo("  counters: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    for s in st["sessions"]:
        who = f", key {s['user'][:8]}..." if s.get("user") else ""
        click.echo(f"  session {s['session']} from {s['peer']}{who}: age {s['age_s']} s, idle {s['idle_s']} s")
        for g in s["stages"]:
            click.echo(
                f"    stage {g['name']!r} (sid {g['sid']}): workers {g['workers']}, credits {g['window']}, "
                f"running {g['running']}, queued {g['queued']}, done {g['completed']}/{g['received']}"
            )
    if not r.healthy:
        raise _Exit(f"{endpoint} is draining", EXIT_UNHEALTHY)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``pid``, ``message`` and, when there is one, ``traceback``."""

    def format(self, record: logging.LogRecord) -> str:
        import datetime

        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def _setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


if __name__ == "__main__":  # pragma: no cover
    main()
