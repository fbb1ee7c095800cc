"""The all_to_all strategy across 2 processes x 4 CPU devices (jax.distributed on 127.0.0.1, gloo collectives)
gives the single-process 8-device result."""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from moe_ops import reference
from tests import multiprocess_worker as worker
from tests.helpers import TOL, assert_close
from tests.xla_flags import xla_cpu_compile_time_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(out_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
               + xla_cpu_compile_time_flags(),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "multiprocess_worker.py"), str(i), str(port),
                               str(out_path)], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"worker {i} exited {p.returncode}:\n{_without_info_lines(log)[-4000:]}"


def _without_info_lines(log):
    """Drop glog info/warning lines and gloo connection chatter, keep tracebacks."""
    return "\n".join(line for line in log.splitlines() if not re.match(r"[IW]\d{4} |\[Gloo\]", line))


@pytest.mark.slow
def test_all_to_all_two_processes_matches_single_process(tmp_path):
    out_path = tmp_path / "result.npz"
    _run_workers(out_path)
    with np.load(out_path) as data:
        multi = [data[f"arr_{i}"] for i in range(6)]
    mesh = jax.make_mesh((8,), ("expert",), axis_types=(AxisType.Auto,))
    args, dy = worker.make_inputs()
    out, grads = worker.forward_and_grads(mesh, args, dy)
    single = [np.asarray(a) for a in (out, *grads)]
    ref_out, vjp = jax.vjp(lambda *a: reference.moe_ffn_dense(*a, top_k=worker.K), *map(jnp.asarray, args))
    ref = [ref_out, *vjp(jnp.asarray(dy))]
    names = ("out", "dx", "dlogits", "dw_gate", "dw_up", "dw_down")
    for name, m, s, r in zip(names, multi, single, ref):
        assert_close(jnp.asarray(m), jnp.asarray(s), 1e-6, f"multi vs single process {name}")
        assert_close(jnp.asarray(m), r, TOL[jnp.float32], f"multi-process vs reference {name}")
