"""TEST-ONLY STAND-IN for torchvision (see tests/sglang_stubs/README.md). Never install this.

SGLang 0.5.12 imports a few torchvision names at module level on code paths that text-only serving
never calls; there is no CPU torchvision on the registry, so the CPU tests provide these names and
make every call fail loudly."""

__version__ = "0.0.0+butler-zoo-test-stand-in"
IS_BUTLER_ZOO_TEST_STAND_IN = True

def _unavailable(name):
    def fn(*args, **kwargs):
        raise RuntimeError(f"torchvision.{name} called, but this is butler-zoo's test-only stand-in (tests/sglang_stubs)")

    fn.__name__ = name.rsplit(".", 1)[-1]
    return fn


from torchvision import io, transforms  # noqa: E402,F401  (after _unavailable, which they use)
