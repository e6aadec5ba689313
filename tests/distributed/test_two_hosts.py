"""Two real hosts: network namespaces joined by a veth pair, each with its own address, and a
torchrun node in each (c10d rendezvous hosted on the first, gloo between them over the veth; the run
directory is on the filesystem both see, as on a cluster's shared storage).

- Killing every training process of one host mid-run makes torchrun (``--max-restarts``) restart
  both hosts' workers, which resume from the last checkpoint.
- Taking the link down for longer than ``train.collective_timeout_s`` fails the job with one clear
  line on each rank and an intact checkpoint; started again once the link is back, it resumes.
- Both interrupted jobs end bit for bit alike, and with the adapters one process trains.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flora_train.run_dir.checkpoints import latest_checkpoint, list_checkpoints, verify_checkpoint

from tests.distributed.helpers import assert_same_adapters, saved_state
from tests.e2e.helpers import SMALL
from tests.integration.test_crash_safety import assert_bitwise_equal

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
RECIPE = ["recipes/quickstart.yaml", *SMALL, "train.epochs=40", "train.checkpoint_every_steps=4", "train.keep_checkpoints=1",
          "train.compare_shared_baseline=false", "export.format=none", "tracking.enabled=false", "eval.at_end=false",
          "train.collective_timeout_s=5"]


class Hosts:
    """Two network namespaces joined by a veth pair: host 0 at 10.233.N.1, host 1 at 10.233.N.2."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.ns = (f"fl{tag}a", f"fl{tag}b")
        self.veth = (f"fl{tag}x", f"fl{tag}y")
        self.addr = tuple(f"10.233.{os.getpid() % 200 + 20}.{k}" for k in (1, 2))

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    def __enter__(self) -> "Hosts":
        for ns in self.ns:
            self._ip("netns", "add", ns)
        self._ip("link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
        for ns, veth, addr in zip(self.ns, self.veth, self.addr):
            self._ip("link", "set", veth, "netns", ns)
            self._ip("-n", ns, "addr", "add", f"{addr}/24", "dev", veth)
            self._ip("-n", ns, "link", "set", "lo", "up")
            self._ip("-n", ns, "link", "set", veth, "up")
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in self.ns:  # nothing started in a namespace outlives the test
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def link(self, up: bool) -> None:
        self._ip("-n", self.ns[0], "link", "set", self.veth[0], "up" if up else "down")

    def torchrun(self, host: int, port: int, max_restarts: int, args: list[str]) -> subprocess.Popen:
        """One node of a two-node job on ``host``: its agent, which starts and restarts its worker."""
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
               "GLOO_SOCKET_IFNAME": self.veth[host]}  # gloo's address: the veth, not the hostname's
        cmd = ["ip", "netns", "exec", self.ns[host], sys.executable, "-m", "flora_train.launch.torchrun", "--nnodes=2",
               "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={self.addr[0]}:{port}", f"--rdzv-id=job{port}",
               f"--rdzv-conf=is_host={int(host == 0)}", f"--local-addr={self.addr[host]}", f"--max-restarts={max_restarts}",
               "-m", "flora_train.cli", "run", *args]
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _workers(agent: subprocess.Popen) -> list[int]:
    """The agent's live workers (an exited worker its blocked agent has not reaped yet is a zombie)."""
    out = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout
    live = []
    for pid in out.split():
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            live.append(int(pid))
    return live


def _wait_for_checkpoint(run_dir: Path, agents: list[subprocess.Popen]) -> None:
    deadline = time.time() + 180
    while not list_checkpoints(run_dir):
        assert all(a.poll() is None for a in agents), "the job ended before it could be interrupted"
        assert time.time() < deadline, "no checkpoint in 180 s"
        time.sleep(0.05)


def _finish(agents: list[subprocess.Popen], timeout: float) -> list[str]:
    outs = []
    for agent in agents:
        try:
            out, _ = agent.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            agent.kill()
            out, _ = agent.communicate()
        outs.append(out)
    return outs


def test_two_hosts_restart_after_a_host_loses_its_processes_and_survive_a_network_cut(tmp_path):
    one = tmp_path / "one-process"
    alone = subprocess.run([sys.executable, "-m", "flora_train.cli", "run", *RECIPE, f"run_dir={one}"], cwd=REPO,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    killed, cut = tmp_path / "killed", tmp_path / "cut"
    with Hosts() as hosts:
        # Every training process of host 1 killed mid-run: both agents restart their workers, which resume.
        agents = [hosts.torchrun(h, 29401, 1, [*RECIPE, f"run_dir={killed}"]) for h in (0, 1)]
        _wait_for_checkpoint(killed, agents)
        victims = _workers(agents[1])
        assert victims, "host 1 runs no worker"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        outs = _finish(agents, 300)
        assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outs)
        assert any("resuming from" in o for o in outs)

        # The link down for longer than the collective timeout: each rank stops with one line naming
        # its intact checkpoint; the job started again once the link is back resumes from it.
        agents = [hosts.torchrun(h, 29402, 0, [*RECIPE, f"run_dir={cut}"]) for h in (0, 1)]
        _wait_for_checkpoint(cut, agents)
        hosts.link(False)
        deadline = time.time() + 120
        while any(_workers(a) for a in agents if a.poll() is None) and time.time() < deadline:
            time.sleep(0.2)
        hosts.link(True)  # (the agents' own rendezvous store goes with host 0's agent)
        outs = _finish(agents, 120)
        assert all(a.returncode != 0 for a in agents)
        lines = [line for o in outs for line in o.splitlines() if line.startswith("flora-train: error: rank")]
        assert len(lines) == 2 and all("lost the job" in line and "train.collective_timeout_s=5" in line
                                       and "is intact: start the job again to resume from it" in line for line in lines), outs
        assert not any("Traceback" in line for o in outs for line in o.splitlines() if line.startswith("[rank"))
        verify_checkpoint(latest_checkpoint(cut))
        agents = [hosts.torchrun(h, 29403, 0, [*RECIPE, f"run_dir={cut}", "--resume"]) for h in (0, 1)]
        outs = _finish(agents, 300)
        assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outs)
        assert any("resuming from" in o for o in outs)
    assert assert_bitwise_equal(saved_state(cut), saved_state(killed)) == 0.0
    assert_same_adapters(saved_state(killed), saved_state(one), "two hosts")
