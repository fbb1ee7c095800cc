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

from moe_ops import IMPLEMENTATIONS, backend, resolve_implementation

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
    where = f" at {'/'.join(frames[-1].filename.split('/')[-2:])}:{frames[-1].lineno}" if frames else ""
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


# The kernel-level interface (moe_ops.backend) each suite needs from a backend module.
NEEDS = {"gmm": ("gmm", "tgmm"),
         "sort": ("sort_by_expert", "gather_rows", "combine_rows", "combine_weight_grad"),
         "layer": ("gmm", "tgmm", "sort_by_expert", "gather_rows", "combine_rows", "combine_weight_grad")}


def probe(requested: str, needs) -> Availability:
    """Load the backend module of ``requested`` and every function in ``needs`` (no compilation): anything that stops
    it makes the implementation unavailable, with that reason. A backend that loads but then fails when measured is
    reported per row as ``error`` (a defect, not an absence)."""
    try:
        impl = resolve_implementation(requested)
    except ValueError as exc:
        return Availability(requested, requested, False, reason(exc))
    try:
        module = backend.ops(impl)
        missing = [name for name in needs if not callable(getattr(module, name, None))]
        if missing:
            return Availability(requested, impl, False, f"{module.__name__} has no callable {missing}", emulation(impl))
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


def _known_config_lookups(impl: str):
    """Config pickers of the shipped kernels, used when a module has no ``describe_config`` hook."""
    if impl == "triton":
        tuning = importlib.import_module("kernels.triton.tuning")
        return lambda m, k, n, e, dtype: tuning.pick_config("gmm", m, k, n, e, dtype).name
    if impl == "pallas":
        tiling = importlib.import_module("kernels.pallas.tiling")
        return lambda m, k, n, e, dtype: str(tiling.choose("gmm", m, k, n, e, dtype, dtype))
    return None


def kernel_config(impl: str, family: str, **shape) -> str | None:
    """The tile config the backend picks for this shape (keyword args m, k, n, e, dtype), or None (XLA has none).

    Uses ``kernels.<impl>.<family>.describe_config(**shape) -> str`` when the kernel module defines it, else the
    known config pickers (Triton ``tuning.pick_config``, Pallas ``tiling.choose``). A failing lookup is shown as such."""
    if impl == "xla":
        return None
    try:
        mod = importlib.import_module(f"kernels.{impl}.{family}")
        hook = getattr(mod, "describe_config", None)
        if callable(hook):
            return str(hook(**shape))
        lookup = _known_config_lookups(impl) if family == "gmm" else None
        return None if lookup is None else lookup(**shape)
    except Exception as exc:  # noqa: BLE001 - a broken lookup must not stop the benchmark, but is shown
        return f"config lookup failed: {reason(exc)}"
