"""Keys per host: each agent and each client has its own pair, agents admit listed client keys,
clients pin each agent's key; a refusal or a changed key is reported as such."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from click.testing import CliRunner

from pypline import Pipeline, configure, work_pool
from pypline.util import unwrap
from pypline.worker_agent.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from conftest import free_endpoint, start_agent  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(120)


def triple(x: int) -> int:
    return 3 * x


def cli(*args: str) -> str:
    r = CliRunner().invoke(main, list(args))
    assert r.exit_code == 0, r.output
    return r.output


def run_with(keys: Path, endpoint: str) -> Any:
    configure(agents=[endpoint], keys=str(keys), fallback="error", connect_timeout=10)
    try:
        start = time.monotonic()
        result = (Pipeline(range(5)) >> work_pool(triple, multi_proc=True)).run_sync()
        return result, time.monotonic() - start
    finally:
        configure()


def ping(keys: Path, endpoint: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pypline.worker_agent", "ping", endpoint, "--keys", str(keys), "--timeout", "5"],
        capture_output=True, text=True, timeout=60,
    )


@pytest.fixture
def hosts(tmp_path: Path) -> Any:
    """An agent host's key folder, two client hosts' (alice admitted, mallory not), an endpoint."""
    agent, alice, mallory = tmp_path / "agent", tmp_path / "alice", tmp_path / "mallory"
    cli("keys", "agent", str(agent))
    cli("keys", "client", str(alice))
    cli("keys", "client", str(mallory))
    cli("keys", "allow", str(agent), str(alice / "client.key"), "alice")
    endpoint = free_endpoint()
    for client in (alice, mallory):
        cli("keys", "trust", str(client), endpoint, str(agent / "agent.key"))
    return agent, alice, mallory, endpoint


def test_each_host_keeps_its_own_secret(hosts: Any, tmp_path: Path) -> None:
    agent, alice, mallory, endpoint = hosts
    assert sorted(p.name for p in agent.rglob("*_secret")) == ["agent.key_secret"]
    assert sorted(p.name for p in alice.rglob("*_secret")) == ["client.key_secret"]
    assert (alice / "known_agents").read_text().count(endpoint) == 1
    h = start_agent(tmp_path, keys=str(agent), endpoint=endpoint, client_keys=str(alice), workers=1)
    try:
        result, _ = run_with(alice, endpoint)
        assert unwrap(result) == [0, 3, 6, 9, 12]
        assert ping(alice, endpoint).returncode == 0
    finally:
        h.kill()


def test_an_unlisted_client_is_told_its_key_was_refused(hosts: Any, tmp_path: Path) -> None:
    agent, alice, mallory, endpoint = hosts
    h = start_agent(tmp_path, keys=str(agent), endpoint=endpoint, client_keys=str(alice), workers=1)
    try:
        result, took = run_with(mallory, endpoint)
        assert result.is_err() and "the agent refused our key" in str(result.unwrap_err())
        assert took < 5  # said at once, not after connect_timeout
        p = ping(mallory, endpoint)
        assert p.returncode != 0 and "the agent refused our key" in p.stderr
        time.sleep(0.3)
        assert "refused a connection from 127." in h.log()  # with the peer's address
        # Revoking alice: her next connection is refused as well.
        cli("keys", "revoke", str(agent), "alice")
        result, _ = run_with(alice, endpoint)
        assert result.is_err() and "the agent refused our key" in str(result.unwrap_err())
    finally:
        h.kill()


def test_a_changed_agent_key_is_refused_by_the_client(hosts: Any, tmp_path: Path) -> None:
    agent, alice, mallory, endpoint = hosts
    impostor = tmp_path / "impostor"
    cli("keys", "agent", str(impostor))
    cli("keys", "allow", str(impostor), str(alice / "client.key"), "alice")
    h = start_agent(tmp_path, keys=str(impostor), endpoint=endpoint, client_keys=str(alice), wait=False)
    try:
        time.sleep(1.0)
        result, took = run_with(alice, endpoint)
        assert result.is_err() and "does not match the one pinned" in str(result.unwrap_err())
        assert took < 5
        p = ping(alice, endpoint)
        assert p.returncode != 0 and "does not match the one pinned" in p.stderr
    finally:
        h.kill()


def test_an_agent_without_a_pin_is_not_contacted(hosts: Any) -> None:
    agent, alice, mallory, endpoint = hosts
    other = free_endpoint()
    result, _ = run_with(alice, other)
    assert result.is_err()
    assert f"no key is pinned for agent {other}" in str(result.unwrap_err())
    assert "pypline-agent keys trust" in str(result.unwrap_err())


def test_refusals_are_logged_a_few_times_per_peer(hosts: Any, tmp_path: Path) -> None:
    agent, alice, mallory, endpoint = hosts
    h = start_agent(tmp_path, keys=str(agent), endpoint=endpoint, client_keys=str(alice), workers=1)
    try:
        for _ in range(8):
            ping(mallory, endpoint)
        time.sleep(0.3)
        assert h.status()["counters"]["refused"] >= 8
        lines = [ln for ln in h.log().splitlines() if "refused a connection from" in ln]
        assert 1 <= len(lines) <= 3, lines
    finally:
        h.kill()
