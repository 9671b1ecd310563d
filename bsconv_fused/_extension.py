"""Loads the compiled extension once; the package still imports (reference path) without it."""

from __future__ import annotations

import contextlib
import importlib
import threading
import warnings
from typing import Iterator, Optional

import torch

_error: Optional[BaseException] = None
try:
    # import_module (not "from . import _C") so that a failure reports its real cause.
    _C = importlib.import_module(f"{__package__}._C")  # registers the TORCH_LIBRARY ops
except (ImportError, OSError) as exc:  # not built, or built against another torch
    _error = exc

if _error is None:
    from . import _args as _args_mod
    from . import ops as _ops

    _ops.register(getattr(_C, "forward", None))
    _args_mod.call_key = getattr(_C, "call_key", None)

# The eager entry of bsconv_fused.functional for remembered calls (csrc/python_call.cpp).
fused_call = getattr(_C, "call", None) if _error is None else None


class _State(threading.local):
    # A class default: a missing per-thread attribute would make every lookup raise and catch
    # an AttributeError inside getattr (about 1 us per fused call).
    force_reference = False


_state = _State()
_warned: set = set()


def extension_available() -> bool:
    """True when the compiled fused kernels were loaded."""
    return _error is None


def extension_error() -> Optional[BaseException]:
    """Why the extension did not load (None when it did)."""
    return _error


@contextlib.contextmanager
def use_reference(enabled: bool = True) -> Iterator[None]:
    """Within this block (this thread), every BSConv call takes the pure-PyTorch reference path.

    For debugging and benchmarks; nests, and restores the previous setting on exit.
    """
    prev = _state.force_reference
    _state.force_reference = enabled
    try:
        yield
    finally:
        _state.force_reference = prev


def reference_forced() -> bool:
    return _state.force_reference


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast would run a convolution in on ``device`` (None when autocast is off).

    Convolutions are on autocast's lower-precision list, so a fused BSConv runs in that dtype,
    exactly as the nn.Conv2d layers it replaces would.
    """
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def fused_available_for(device: torch.device) -> bool:
    """Whether the fused op has a kernel for ``device``; warns once (per reason) when not."""
    if reference_forced():
        return False
    if _error is not None:
        _warn_once("ext", f"bsconv_fused: the compiled extension is not available ({_error}); "
                          "using the pure-PyTorch reference path")
        return False
    kind = device.type
    if kind == "cpu" or kind == "meta":
        return True
    key = kind.upper() if kind != "cuda" else "CUDA"
    if torch._C._dispatch_has_kernel_for_dispatch_key("bsconv_fused::forward", key):
        return True
    _warn_once(device.type, f"bsconv_fused: no fused kernel for device type '{device.type}' "
                            "in this build; using the pure-PyTorch reference path")
    return False
