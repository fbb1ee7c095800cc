"""Worker for ``test_multiprocess``: one of 2 processes x 4 CPU devices running the ``all_to_all`` strategy over an
8-device expert mesh (``jax.distributed`` on 127.0.0.1, gloo CPU collectives). Process 0 writes the gathered
forward output and gradients to an ``.npz``.

Usage: python tests/multiprocess_worker.py PROCESS_ID PORT OUT_PATH   (XLA_FLAGS gives 4 host devices)."""

from __future__ import annotations

import functools
import sys

import numpy as np

T, D, F, E, K = 32, 16, 16, 8, 2


def make_inputs():
    """Deterministic host inputs (x, logits, w_gate, w_up, w_down), cotangent dy: a hot-expert routing."""
    from moe_ops import imbalance
    rng = np.random.default_rng(11)
    ids = imbalance.hot_ids(T, E, K, num_hot=1, factor=3.0, hot_experts=[6])
    logits = imbalance.logits_for_ids(ids, E, seed=11)
    x = rng.normal(size=(T, D)).astype(np.float32)
    ws = [(0.3 * rng.normal(size=shape)).astype(np.float32) for shape in [(E, D, F), (E, D, F), (E, F, D)]]
    dy = rng.normal(size=(T, D)).astype(np.float32)
    return (x, logits, *ws), dy


def forward_and_grads(mesh, args, dy):
    """Jitted forward + VJP of the partitioned op (all_to_all) on host arrays placed with the expert sharding."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from moe_ops import moe_ffn
    from moe_ops.sharding import MoEShardingConfig
    sharding = NamedSharding(mesh, P("expert"))
    place = lambda a: jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])
    fn = functools.partial(moe_ffn, top_k=K, sharding=MoEShardingConfig(strategy="all_to_all"))

    def value_and_grads(args, dy):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(dy)

    return jax.jit(value_and_grads)([place(a) for a in args], place(dy))


def main(process_id: int, port: int, out_path: str):
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # already the default in jax 0.10.2
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    from jax.experimental import multihost_utils
    assert jax.device_count() == 8 and jax.local_device_count() == 4, (jax.device_count(), jax.local_device_count())
    mesh = jax.make_mesh((8,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
    args, dy = make_inputs()
    out, grads = forward_and_grads(mesh, args, dy)
    gathered = [np.asarray(multihost_utils.process_allgather(a, tiled=True)) for a in (out, *grads)]
    if process_id == 0:
        np.savez(out_path, *gathered)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
