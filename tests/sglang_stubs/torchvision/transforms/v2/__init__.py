"""TEST-ONLY STAND-IN (see tests/sglang_stubs/README.md)."""
from torchvision import _unavailable
from torchvision.transforms.v2 import functional  # noqa: F401


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _unavailable(f"transforms.v2.{name}")
