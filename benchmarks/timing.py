"""Timing done right: warm-up, device-synchronised calls, median of repeats, rotating inputs, first-call checks.

``measure(fn, input_sets, check=...)``:

1. The first call (on ``input_sets[0]``) is also the correctness call: its output goes to ``check`` (which returns
   a dict of relative errors, see ``Parity``) before any timing; a failing or raising check marks the measurement.
2. ``warmup`` more untimed calls (compilation, autotuning caches, allocator).
3. ``repeats`` timed calls, each ``fn(*inputs)`` followed by ``block_until_ready`` on every output leaf, cycling
   through ``input_sets`` so that a cache holding the last call's operands cannot flatter the figure.
4. The figure is the median; all samples are kept.
5. Then ``repeats`` more calls issued back-to-back with one sync after the last (``pipelined_s``, their mean): the
   host runs ahead of the device as in a training step, so per-call dispatch and sync latency drop out. A
   synchronised median well above it means host overhead, not device time, sets the figure (small shapes).

Inputs are random (``random_normal``), never zeros: zeros would let a wrong kernel look right and a sparse-aware
unit look fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Timing:
    median_s: float
    samples_s: tuple[float, ...]
    warmup: int
    repeats: int
    rotations: int
    pipelined_s: float | None = None

    def as_dict(self) -> dict:
        pipelined = None if self.pipelined_s is None else self.pipelined_s * 1e3
        return {"time_ms": self.median_s * 1e3, "samples_ms": [s * 1e3 for s in self.samples_s],
                "warmup": self.warmup, "repeats": self.repeats, "rotations": self.rotations,
                "pipelined_ms": pipelined}


@dataclasses.dataclass(frozen=True)
class Parity:
    """Norm-relative errors ``||got - want|| / ||want||`` per output, against ``against``; ok iff max <= tol."""
    errors: dict
    against: str
    tol: float

    @property
    def max_rel_err(self) -> float:
        return max(self.errors.values()) if self.errors else float("nan")

    @property
    def ok(self) -> bool:
        return bool(self.errors) and self.max_rel_err <= self.tol

    def as_dict(self) -> dict:
        return {"max_rel_err": self.max_rel_err, "errors": dict(self.errors), "against": self.against,
                "tol": self.tol, "ok": self.ok}


def to_numpy(x) -> np.ndarray:
    """Host f64 copy of a jax / numpy / torch array (bf16 included)."""
    if type(x).__module__.startswith("torch"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x).astype(np.float64)


def rel_err(got, want) -> float:
    """Norm-relative error in f64; a non-finite value anywhere gives inf (poisoned rows must not pass)."""
    got, want = to_numpy(got), to_numpy(want)
    if got.shape != want.shape:
        raise ValueError(f"shape mismatch in parity check: {got.shape} vs {want.shape}")
    if not np.isfinite(got).all():
        return float("inf")
    denom = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / (denom if denom > 0 else 1.0))


def sync(tree) -> None:
    """Block until every array leaf of ``tree`` is computed (torch CUDA tensors: synchronise the stream)."""
    for leaf in jax.tree_util.tree_leaves(tree):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
        elif type(leaf).__module__.startswith("torch"):
            import torch
            if leaf.is_cuda:
                torch.cuda.synchronize(leaf.device)


def random_normal(key, shape, dtype, scale: float = 1.0):
    """Standard-normal data (times ``scale``) in ``dtype``: random, never zeros.

    On CPU it is drawn with numpy (seeded from ``key``): no XLA compilation per shape, which dominates small runs
    there; on accelerators with ``jax.random`` on device (no host transfer of GiB-sized operands)."""
    if jax.default_backend() == "cpu":
        seed = int(np.asarray(jax.random.key_data(key)).ravel()[-1])
        data = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * np.float32(scale)
        return jax.numpy.asarray(data.astype(jax.numpy.dtype(dtype)))
    return (jax.random.normal(key, shape, jax.numpy.float32) * scale).astype(dtype)


def rotations_for(bytes_per_set: int, cache_bytes: int = 64 << 20, most: int = 4) -> int:
    """How many distinct input sets to cycle through so that the set timed is never the one left in cache."""
    if bytes_per_set >= 4 * cache_bytes:
        return 1
    return int(min(most, max(2, -(-4 * cache_bytes // max(bytes_per_set, 1)))))


def measure(fn: Callable, input_sets: Sequence[Sequence[Any]], *, warmup: int = 2, repeats: int = 10,
            check: Callable[[Any], Parity] | None = None, pipelined: bool = True) -> tuple[Timing, Parity | None]:
    """Time ``fn`` (see module docstring). Returns (timing, parity of the first call or None without ``check``)."""
    if not input_sets:
        raise ValueError("measure needs at least one input set")
    out = fn(*input_sets[0])
    sync(out)
    parity = check(out) if check is not None else None
    del out
    for i in range(warmup):
        sync(fn(*input_sets[(i + 1) % len(input_sets)]))
    samples = []
    for i in range(repeats):
        args = input_sets[i % len(input_sets)]
        start = time.perf_counter()
        sync(fn(*args))
        samples.append(time.perf_counter() - start)
    pipelined_s = _pipelined(fn, input_sets, repeats) if pipelined else None
    return Timing(statistics.median(samples), tuple(samples), warmup, repeats, len(input_sets), pipelined_s), parity


def _pipelined(fn: Callable, input_sets: Sequence[Sequence[Any]], repeats: int) -> float:
    """Mean seconds per call of ``repeats`` calls issued back-to-back, one sync after the last (module docstring,
    step 5). Only the last output is kept: one stream runs them in order, so it finishes last."""
    start = time.perf_counter()
    out = None
    for i in range(repeats):
        out = fn(*input_sets[i % len(input_sets)])
    sync(out)
    return (time.perf_counter() - start) / repeats


class Stopped(Exception):
    """SIGTERM (``timeout``, a lease ending) arrived at ``at`` (``time.time()``): the suites stop at the next case
    boundary and report what finished instead of losing it."""

    def __init__(self, at: float):
        super().__init__(f"SIGTERM at {at:.0f}")
        self.at = at


_STOP = {"at": None}  # when SIGTERM came, while ``stop_on_sigterm`` is active


@contextlib.contextmanager
def stop_on_sigterm():
    """While the suites run, SIGTERM raises ``Stopped`` (main thread only; the previous handler is restored after).
    A raise swallowed where it lands (an interpreter callback turns it into a row error) still stops the run: the
    request is kept and ``Progress.step`` raises again at the end of the case. A second SIGTERM acts as before."""
    def stop(signum, frame):
        _STOP["at"] = time.time()
        signal.signal(signal.SIGTERM, previous)
        raise Stopped(_STOP["at"])
    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: no handler can be installed
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _STOP["at"] = None


class Progress:
    """A progress bar over a sweep (tqdm, when installed and ``enabled``); otherwise one plain line per finished step
    on stderr with its seconds, so a log shows where a run's time went and how far a stopped run got."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.n = total, desc, 0
        self._bar = None
        self._last = time.perf_counter()
        if enabled:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
            except ImportError:
                self._bar = None

    def step(self, label: str = "") -> None:
        """One step done; raises ``Stopped`` if SIGTERM came during it (``stop_on_sigterm``)."""
        self.n += 1
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=False)
            self._bar.update(1)
        else:
            now = time.perf_counter()
            print(f"[{self.desc} {self.n}/{self.total}] {label} ({now - self._last:.1f} s)", file=sys.stderr,
                  flush=True)
            self._last = now
        if _STOP["at"] is not None:
            raise Stopped(_STOP["at"])

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
