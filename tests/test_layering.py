"""The layers of the tree: ``kernels`` never imports ``moe_ops`` (the kernels choose their own platform code)."""

import subprocess
import sys


def test_kernels_do_not_import_moe_ops():
    code = ("import sys, importlib, pkgutil, kernels\n"
            "for m in pkgutil.walk_packages(kernels.__path__, 'kernels.'):\n"
            "    importlib.import_module(m.name)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'moe_ops')\n"
            "assert not bad, bad\n"
            "print('ok', len([m for m in sys.modules if m.startswith('kernels')]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-2000:]
