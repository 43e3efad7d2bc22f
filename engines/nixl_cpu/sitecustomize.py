"""Makes NIXL's UCX progress thread sleep in poll() instead of spinning; for vLLM PD on small CPU hosts.

nixl's Python API (`nixl_cuXX._api.nixl_agent`) hard-codes `pthrDelay = 0`, so the UCX backend's shared
progress thread polls with a 0 ms timeout: every idle NixlConnector vLLM burns one full core. On a
2-core machine the prefill and decode spinners starve the engines (startup of the second instance
stalls for minutes). With a delay the thread blocks in poll() on UCX's event fds, waking at least every
NIXL_PTHR_DELAY_US (default 1000 us, rounded up to whole ms by NIXL).

It also asks Linux for AMX tile permission at interpreter start (x86-64 only, one syscall). UCX installs
an alternate signal stack too small for AMX state; once one exists the kernel refuses the permission
PyTorch requests later, and vLLM's AMX attention kernel (bf16, on CPUs with AMX) dies with SIGILL in the
decode worker at its first step after a NIXL transfer. Asked before UCX loads, it is granted.

Used by putting this directory on PYTHONPATH of the vLLM processes (spawned workers inherit it); it
patches lazily, when vLLM first imports nixl, and touches nothing else.
"""
from __future__ import annotations

import ctypes
import importlib.abc
import importlib.machinery
import os
import platform
import sys

_TARGETS = {"nixl_cu12._api", "nixl_cu13._api"}
_DELAY_US = int(os.environ.get("NIXL_PTHR_DELAY_US", "1000"))


class _Bindings:
    """The `_bindings` module as `_api` sees it, with a nixlAgent that sets the progress delay."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def nixlAgent(self, name, config):  # noqa: N802 - mirrors the binding's name
        config.pthrDelay = _DELAY_US
        return self._real.nixlAgent(name, config)


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, real):
        self._real = real

    def create_module(self, spec):
        return self._real.create_module(spec)

    def exec_module(self, module):
        self._real.exec_module(module)
        module.nixlBind = _Bindings(module.nixlBind)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _TARGETS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader)
        return spec


if _DELAY_US > 0:
    sys.meta_path.insert(0, _Finder())


def _request_amx_permission() -> None:
    """arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); a no-op where AMX is absent or refused."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return
    try:
        ctypes.CDLL(None).syscall(158, 0x1023, 18)  # SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XTILEDATA
    except (OSError, AttributeError):
        pass


_request_amx_permission()
