"""Agent endpoints written without ``tcp://`` are accepted; malformed ones get one line naming
the expected form, in configure(), PYPLINE_AGENTS, ping, status and serve --bind. And a
run names an unknown backend even when no stage would use it."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner

from pypline import Pipeline, configure, work_pool
from pypline.lowlevel import current_settings, effective_agents, normalize_endpoint
from pypline.worker_agent.cli import main


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("127.0.0.1:5555", "tcp://127.0.0.1:5555"),
        ("tcp://10.0.0.2:5555", "tcp://10.0.0.2:5555"),
        ("  host.example:7 ", "tcp://host.example:7"),
        ("ipc:///tmp/agent.sock", "ipc:///tmp/agent.sock"),
    ],
)
def test_endpoints_are_completed(given: str, expected: str) -> None:
    assert normalize_endpoint(given) == expected


@pytest.mark.parametrize("bad", ["127.0.0.1", "tcp://host", "tcp://:5555", "http://h:80", "h:0", "h:99999", ""])
def test_malformed_endpoints_name_the_form(bad: str) -> None:
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        normalize_endpoint(bad)


def test_configure_and_environment_accept_host_port(monkeypatch: pytest.MonkeyPatch) -> None:
    previous = configure(agents=["127.0.0.1:5555"])
    try:
        assert current_settings().agents == ("tcp://127.0.0.1:5555",)
        with pytest.raises(ValueError, match="not of the form"):
            configure(agents=["127.0.0.1"])
    finally:
        configure(previous)
    configure()
    monkeypatch.setenv("PYPLINE_AGENTS", "127.0.0.1:5555, tcp://127.0.0.2:6000")
    assert effective_agents(current_settings()) == ("tcp://127.0.0.1:5555", "tcp://127.0.0.2:6000")
    monkeypatch.setenv("PYPLINE_AGENTS", "nonsense")
    with pytest.raises(ValueError, match="PYPLINE_AGENTS: agent endpoint 'nonsense'"):
        effective_agents(current_settings())


@pytest.mark.parametrize("args", [["ping", "nonsense"], ["status", "host"], ["serve", "--bind", "tcp://:1"]])
def test_cli_rejects_a_malformed_endpoint_in_one_line(args: list[str]) -> None:
    """A usage error (exit 2) naming the expected form, never a traceback or a CURVE message."""
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "tcp://HOST:PORT" in r.output
    assert "Traceback" not in r.output and "CURVE" not in r.output


def test_an_unknown_backend_is_named_even_when_no_stage_uses_it(arun: Any) -> None:
    """run(executor="nope") with only asyncio stages raises at once, listing the known ones."""
    p = Pipeline([1]) >> work_pool(lambda x: x)
    with pytest.raises(ValueError, match="unknown pypline backend 'nope'.*asyncio"):
        p.run_sync(executor="nope")
    with pytest.raises(ValueError, match="unknown pypline backend"):
        p.stream(executor="nope")
    with pytest.raises(TypeError, match="executor must be"):
        p.run_sync(executor=42)
