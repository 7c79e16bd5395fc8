"""TEST-ONLY STAND-IN (see tests/sglang_stubs/README.md)."""
from torchvision import _unavailable
from torchvision.transforms import InterpolationMode  # noqa: F401


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _unavailable(f"transforms.functional.{name}")
