"""Import the Triton kernel modules lazily, in the mode Triton itself runs in.

Whether Triton compiles kernels or interprets them (``TRITON_INTERPRET=1``) is fixed for the whole
process when ``triton`` is first imported: its own library functions (``tl.max``, ``tl.cumsum``,
...) are built for one mode, and a kernel of the other mode cannot call them. So:

* butler_kernels imports no Triton code until a kernel is launched (CPU-only users of the
  reference never need Triton);
* the kernel modules are decorated in the mode ``triton.language`` was built in, whatever the
  environment says by then;
* CPU tensors need the interpreter; CUDA tensors normally run compiled kernels (the interpreter
  also accepts them, by copying them to the host).
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType
from typing import Any, NamedTuple

_lock = threading.Lock()
_modules: dict[str, ModuleType] = {}
_interpreted: list[bool] = []  # memo of triton_interpreted(); fixed once triton is imported
_sm_count: dict[int, int] = {}

# Test hook: when set, scratch buffers the kernels must fully overwrite before reading are filled
# with this value instead of left uninitialised, so that a kernel reading stale scratch fails
# deterministically (NaN for float buffers).
SCRATCH_POISON: int | None = None


def triton_interpreted() -> bool:
    """True when Triton was imported in interpreter mode (``TRITON_INTERPRET=1`` at its import)."""
    if _interpreted:
        return _interpreted[0]
    try:
        import triton.language.standard as standard
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(
            "butler_kernels' Triton kernels need the `triton` package (bundled with CUDA builds of torch; "
            "`pip install triton` for the CPU interpreter). impl='reference' runs without it."
        ) from exc
    _interpreted.append(isinstance(standard.max, InterpretedFunction))
    return _interpreted[0]


def kernel_module(name: str, device) -> ModuleType:
    """The kernel module ``butler_kernels.<name>``, ready for tensors on ``device``."""
    interpreted = triton_interpreted()
    device_type = getattr(device, "type", device)
    if device_type != "cuda" and not interpreted:
        raise RuntimeError(
            f"Triton kernels run on {device_type} tensors only in the Triton interpreter: set "
            "TRITON_INTERPRET=1 before `triton` is first imported in the process, or use the reference "
            "implementation (impl='reference', or the butler:: ops, which use it off CUDA)"
        )
    mod = _modules.get(name)
    if mod is None:
        with _lock:
            from triton import knobs

            with knobs.runtime.scope():
                knobs.runtime.interpret = interpreted
                mod = _modules[name] = importlib.import_module(f"butler_kernels.{name}")
    return mod


class Launch(NamedTuple):
    """One kernel launch: ``module.<kernel>[grid](*args, **meta)`` (meta: constexprs and options)."""

    kernel: str
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    meta: dict[str, Any]


def run_launches(module_name: str, launches: list[Launch]) -> None:
    """Launch in order on the current stream. The interpreter takes no compiler options."""
    device = next(a for a in launches[0].args if hasattr(a, "device")).device
    mod = kernel_module(module_name, device)
    interpreted = triton_interpreted()
    if not interpreted and device.index is not None:
        import torch

        if device.index != torch.cuda.current_device():
            # Triton launches on the current device: make it the tensors' one.
            with torch.cuda.device(device):
                _launch(mod, launches, interpreted)
            return
    _launch(mod, launches, interpreted)


def _launch(mod: ModuleType, launches: list[Launch], interpreted: bool) -> None:
    for launch in launches:
        meta = launch.meta
        if interpreted:
            meta = {k: v for k, v in meta.items() if k not in ("num_warps", "num_stages")}
        getattr(mod, launch.kernel)[launch.grid](*launch.args, **meta)


def scratch(shape, dtype, device):
    """``torch.empty``, or a poisoned buffer under ``SCRATCH_POISON``."""
    import torch

    if SCRATCH_POISON is None:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else SCRATCH_POISON
    return torch.full(shape, fill, dtype=dtype, device=device)


def num_sms(device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 under the interpreter, which runs one program
    at a time, so that launch heuristics do not split work for parallelism there."""
    if getattr(device, "type", device) != "cuda" or triton_interpreted():
        return 1
    import torch

    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_count:
        _sm_count[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sm_count[idx]
