"""More than one host: two network namespaces joined by a veth pair stand for two
machines (each its own IP stack and hostname; nothing shared but the veth link), and the
training equivalence of tests/test_torch_adapter.py runs across them:

- `mpiexec` with two hosts: Hydra starts the remote rank through a launcher that enters
  the other namespace instead of ssh (tests/workers/netns_launch.sh); MPICH sends over
  TCP on the veth link (shared memory off), which the link's byte counters confirm;
- `torchrun` multi-node: one torchrun per host, a c10d rendezvous on the first host's
  address, gloo over the veth link.

Needs root (CAP_SYS_ADMIN/NET_ADMIN) and iproute2; CI runs as root. Elsewhere it skips,
saying why."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_torch_adapter import check_training_results

from conftest import ROOT, WORKERS, mpiexec_path

IFACE = "sbnet"  # the veth end's name inside each namespace
A, B = "10.77.0.1", "10.77.0.2"


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture(scope="module")
def hosts():
    """Two namespaces ("hosts") joined by a veth pair; removed afterwards."""
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        pytest.skip("needs iproute2's `ip` and util-linux's `unshare` (apt-get install "
                    "iproute2)")
    tag = f"sbn{os.getpid()}"
    ns = (tag + "a", tag + "b")
    made = []
    try:
        for n in ns:
            r = _ip("netns", "add", n, check=False)
            if r.returncode != 0:
                pytest.skip(f"cannot make network namespaces here ({r.stderr.strip()}); "
                            "the multi-host tests need root")
            made.append(n)
        _ip("link", "add", tag + "x", "type", "veth", "peer", "name", tag + "y")
        for n, dev, addr in ((ns[0], tag + "x", A), (ns[1], tag + "y", B)):
            _ip("link", "set", dev, "netns", n)
            _ip("-n", n, "link", "set", dev, "name", IFACE)
            _ip("-n", n, "addr", "add", f"{addr}/24", "dev", IFACE)
            _ip("-n", n, "link", "set", IFACE, "up")
            _ip("-n", n, "link", "set", "lo", "up")
        # `ip netns exec` mounts /etc/netns/NS/hosts over /etc/hosts: each host resolves
        # both hostnames (torchrun's rendezvous looks its own up).
        for n in ns:
            etc = Path("/etc/netns") / n
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{A} {ns[0]}\n{B} {ns[1]}\n")
        yield {A: ns[0], B: ns[1]}
    finally:
        for n in made:
            _ip("netns", "delete", n, check=False)  # takes its veth end (and the pair) along
            shutil.rmtree(Path("/etc/netns") / n, ignore_errors=True)


def rx_bytes(ns):
    out = _ip("-n", ns, "-s", "-j", "link", "show", IFACE).stdout
    import json

    return json.loads(out)[0]["stats64"]["rx"]["bytes"]


def in_ns(ns, cmd):
    """cmd run inside namespace ns with its own hostname."""
    return ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c",
            f"hostname {ns} && exec " + " ".join(map(str, cmd))]


def test_training_equivalence_under_mpiexec_across_two_hosts(hosts, tmp_path):
    ns_a, ns_b = hosts[A], hosts[B]
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPIEXEC_TIMEOUT="240",
               SYNCBN_NETNS_HOSTS=f"{A}={ns_a},{B}={ns_b}",
               # One rank per host over TCP on the veth link: no shared memory between
               # them (MPICH would otherwise notice they share a machine).
               MPIR_CVAR_NOLOCAL="1", MPIR_CVAR_CH4_NETMOD="ofi", FI_PROVIDER="tcp",
               FI_TCP_IFACE=IFACE)
    before = rx_bytes(ns_b)
    cmd = [mpiexec_path(), "-genvall", "-hosts", f"{A},{B}", "-ppn", "1", "-n", "2",
           "-launcher", "ssh", "-launcher-exec", WORKERS / "netns_launch.sh",
           sys.executable, "-m", "mpi4py", WORKERS / "torch_train.py", tmp_path, "mpi"]
    proc = subprocess.run(in_ns(ns_a, cmd), capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    check_training_results(tmp_path, 2)
    # The rank on host B received its share of the all-reduces over the link.
    assert rx_bytes(ns_b) - before > 20_000


def test_training_equivalence_under_torchrun_multinode_across_two_hosts(hosts, tmp_path):
    ns_a, ns_b = hosts[A], hosts[B]
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               GLOO_SOCKET_IFNAME=IFACE)
    before = rx_bytes(ns_b)
    procs = []
    for node, ns in enumerate((ns_a, ns_b)):
        cmd = [torchrun, "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint={A}:29517", "--rdzv-id=syncbn",
               "--max-restarts=0", WORKERS / "torch_train.py", tmp_path, "ddp"]
        procs.append(subprocess.Popen(in_ns(ns, cmd), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, env=env,
                                      cwd=WORKERS))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-5000:]
    check_training_results(tmp_path, 2)
    assert rx_bytes(ns_b) - before > 20_000
