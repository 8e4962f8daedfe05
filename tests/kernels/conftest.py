from __future__ import annotations

import pytest

from lamina.kernels import native


@pytest.fixture
def native_lib():
    """The built kernel library; tests that exercise it skip only on CPUs without AVX-512 VNNI."""
    if not native.cpu_supported():
        pytest.skip("this CPU lacks AVX-512 VNNI")
    lib = native.library()
    assert lib is not None, f"the native kernels failed to build here: {native.unavailable_reason()}"
    return lib
