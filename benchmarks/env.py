"""What we run on and with: device, versions, and which ``moe_ops`` implementations can run (never a silent fallback).

An implementation is *available* for a suite when a tiny probe of exactly the ops that suite uses runs; otherwise it
is reported as unavailable with the exception that stopped it. On CPU, ``triton`` runs through the Triton
interpreter bridge and ``pallas`` in interpret mode: both are labelled *emulated* and kept to tiny shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import platform
import traceback

import jax

from moe_ops import IMPLEMENTATIONS, resolve_implementation

_DISTRIBUTIONS = ("jax", "jaxlib", "triton", "jax-triton", "torch", "tokamax", "numpy", "matplotlib")


@functools.cache
def versions() -> dict:
    """Installed versions (None when absent) of the packages that decide the numbers."""
    out = {"python": platform.python_version()}
    for dist in _DISTRIBUTIONS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


@functools.cache
def device() -> dict:
    dev = jax.devices()[0]
    return {"backend": jax.default_backend(), "kind": getattr(dev, "device_kind", str(dev)),
            "count": jax.device_count(), "host": platform.node(), "machine": platform.machine()}


def on_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda", "rocm")


def emulation(impl: str) -> str | None:
    """How ``impl`` runs here when it is not native code for this device (None when it is native)."""
    backend = jax.default_backend()
    if impl == "triton" and backend == "cpu":
        return "Triton interpreter via the CPU bridge (kernels.triton.bridge)"
    if impl == "pallas" and backend != "tpu":
        return "Pallas interpret mode"
    return None


def reason(exc: BaseException) -> str:
    """One line naming the exception and where it came from (the innermost frame in this project)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/site-packages/" not in f.filename]
    where = f" at {frames[-1].filename.rsplit('/', 2)[-2:][-1]}:{frames[-1].lineno}" if frames else ""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg[:300]}{where}"


def is_oom(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(s in text for s in ("resource_exhausted", "out of memory", "resourceexhausted", "oom"))


@dataclasses.dataclass(frozen=True)
class Availability:
    requested: str
    implementation: str   # moe_ops.resolve_implementation(requested): the backend that actually runs
    available: bool
    reason: str = ""
    emulated: str | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def probe(requested: str, probe_fn) -> Availability:
    """Run ``probe_fn(implementation)`` (a tiny call of the suite's ops, blocking); any exception = unavailable."""
    try:
        impl = resolve_implementation(requested)
    except ValueError as exc:
        return Availability(requested, requested, False, reason(exc))
    try:
        importlib.import_module({"xla": "moe_ops.xla", "triton": "kernels.triton",
                                 "pallas": "kernels.pallas"}[impl])
        jax.block_until_ready(probe_fn(impl))
    except Exception as exc:  # noqa: BLE001 - anything that stops it is the reason it is unavailable
        return Availability(requested, impl, False, reason(exc), emulation(impl))
    return Availability(requested, impl, True, "", emulation(impl))


def parse_impls(spec: str | None) -> list[str]:
    if not spec:
        return list(IMPLEMENTATIONS)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in IMPLEMENTATIONS]
    if bad:
        raise SystemExit(f"unknown implementation(s) {bad}; known: {list(IMPLEMENTATIONS)}")
    return names


def kernel_config(impl: str, family: str, **shape) -> str | None:
    """The tile config the backend picks for this shape, when the kernel module exposes a hook for it.

    Looks for ``kernels.<impl>.<family>.describe_config(**shape) -> str`` (keyword args such as m, k, n, e, dtype);
    returns None when there is no such hook (the XLA backend has no configs)."""
    if impl == "xla":
        return None
    try:
        mod = importlib.import_module(f"kernels.{impl}.{family}")
    except ImportError:
        return None
    hook = getattr(mod, "describe_config", None)
    if not callable(hook):
        return None
    try:
        return str(hook(**shape))
    except Exception as exc:  # noqa: BLE001 - a broken hook must not stop the benchmark, but is shown
        return f"describe_config failed: {reason(exc)}"
