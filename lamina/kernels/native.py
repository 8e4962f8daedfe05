"""Build and load Lamina's native CPU kernels (C sources in this package) on first use.

The kernels are plain C with AVX-512 intrinsics, compiled by the system C compiler into a shared
library cached under `~/.cache/lamina/kernels` (or `$LAMINA_CACHE_DIR/kernels`), keyed by a hash of
the source, the flags and the compiler, and loaded with ctypes. Building takes about half a second;
every later process loads the cached file. The library's OpenMP calls resolve to the libgomp that
torch has already loaded (same soname), so both share one thread pool and `torch.set_num_threads`.

When the CPU lacks AVX-512 VNNI, no C compiler is found, the build fails, or `LAMINA_NATIVE_KERNELS=0`,
`library()` returns None and callers keep their torch kernels; `unavailable_reason()` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCES = tuple(
    Path(__file__).with_name(name) for name in ("blockq.c", "dense.c", "attention.c", "llama_layer.c")
)
HEADERS = (Path(__file__).with_name("vector_math.h"),)
FLAGS = (
    *("-O3", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off"),
    *("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma"),
)
#: /proc/cpuinfo flags the compiled code needs.
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "fma")
DISABLE_ENV = "LAMINA_NATIVE_KERNELS"

_reason: list[str] = []  # why `library()` returned None, once it has


def cache_dir() -> Path:
    """Where built kernels are kept."""
    root = os.environ.get("LAMINA_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "lamina") / "kernels"


def cpu_supported() -> bool:
    """Whether this CPU has every instruction set the kernels use (Linux /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return all(flag in flags for flag in CPU_FLAGS)


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)


def _build(compiler: str) -> Path:
    """Compile the source into the cache (atomically: a temporary file renamed into place)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    sources = b"".join(source.read_bytes() for source in (*SOURCES, *HEADERS))
    key = hashlib.sha256(sources + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    target = cache_dir() / f"lamina-kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run(
            [compiler, *FLAGS, *map(str, SOURCES), "-o", str(built)], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip().splitlines()[-1:]}")
        os.replace(built, target)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None when it cannot be used here (see `unavailable_reason`)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        _reason.append(f"disabled by {DISABLE_ENV}=0")
        return None
    if not cpu_supported():
        _reason.append("this CPU lacks AVX-512 VNNI")
        return None
    compiler = _compiler()
    if compiler is None:
        _reason.append("no C compiler (cc, gcc or clang) found")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError) as err:
        _reason.append(f"building the kernels failed: {err}")
        return None
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.lamina_blockq_matmul.argtypes = [pointer, i64, i64, pointer, pointer, pointer, i64, i32, i32, pointer, i32, pointer, i64]  # fmt: skip
    lib.lamina_blockq_matmul.restype = ctypes.c_int
    lib.lamina_decode_attention.argtypes = [pointer, i64, i64, i64, pointer, pointer, i64, i64, i64]
    lib.lamina_decode_attention.argtypes += [i64] * 7 + [ctypes.c_float, pointer]
    lib.lamina_decode_attention.restype = ctypes.c_int
    lib.lamina_f32_linear.argtypes = [pointer, i64, i64, pointer, i64, pointer, pointer, i64]
    lib.lamina_f32_linear.restype = None
    lib.lamina_llama_layer.argtypes = [pointer, pointer, i64, i64, pointer, pointer, pointer, pointer, i64, i64, i64]  # fmt: skip
    lib.lamina_llama_layer.restype = ctypes.c_int
    return lib


def unavailable_reason() -> str | None:
    """Why the native kernels are not used, or None when they are."""
    if library() is not None:
        return None
    return _reason[-1] if _reason else "unavailable"


def blockq_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    d: torch.Tensor,
    m: torch.Tensor | None,
    bits: int,
    offset: int,
    lut: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [M, N] float32 = x [M, K] float32 (contiguous) times the tiled block-quantized weight.

    `codes`, `d`, `m` are in the tile layout described in blockq.c (`lamina.quant.blocks` builds it);
    `lut` is a 4-bit code book's uint8 [32] table (blockq.c), or None for linear codes. d holds a
    scale per 32 weights, or per 16 (d.shape[1] == K / 16). N = d.shape[0] * 16. Needs `library()`.
    """
    lib = library()
    rows, k = x.shape
    n = d.shape[0] * d.shape[2]
    y = torch.empty(rows, n, dtype=torch.float32)
    status = lib.lamina_blockq_matmul(
        x.data_ptr(), rows, k, codes.data_ptr(), d.data_ptr(), None if m is None else m.data_ptr(),
        n, bits, offset, None if lut is None else lut.data_ptr(), k // d.shape[1], y.data_ptr(), n,
    )  # fmt: skip
    if status != 0:
        raise MemoryError(f"blockq matmul: no memory for the quantized activations ({rows} x {k})")
    return y


def f32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ weight [N, K]^T + bias, all float32 and contiguous, on the CPU kernel
    (needs `library()`); each row computed alone, as a one-row call would."""
    rows, k = x.shape
    y = torch.empty(rows, weight.shape[0], dtype=torch.float32)
    n = weight.shape[0]
    bias_ptr = None if bias is None else bias.data_ptr()
    library().lamina_f32_linear(x.data_ptr(), rows, k, weight.data_ptr(), n, bias_ptr, y.data_ptr(), n)
    return y


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, window: int, scale: float
) -> torch.Tensor | None:
    """Causal attention of q [B, T, H, D] (float32, last dim contiguous; positions start..start+T-1)
    over keys/values [B, Hkv, >=start+T, D] (float32, last dim contiguous) -> [B, T, H, D] contiguous.

    Each row attends its own prefix (within `window` when > 0), as decoding would. None when the
    shape is outside the kernel's reach (head dim not a multiple of 16 or over 256, over 16 query
    heads per KV head) or the library is unavailable: the caller then uses SDPA.
    """
    lib = library()
    batch, rows, heads, dim = q.shape
    if lib is None or dim % 16 or dim > 256 or heads // keys.shape[1] > 16:
        return None
    if q.stride(-1) != 1 or keys.stride() != values.stride() or keys.stride(-1) != 1:
        return None
    out = torch.empty(batch, rows, heads, dim, dtype=torch.float32)
    status = lib.lamina_decode_attention(
        q.data_ptr(), q.stride(0), q.stride(1), q.stride(2),
        keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1), keys.stride(2),
        batch, rows, heads, keys.shape[1], dim, start, window, scale, out.data_ptr(),
    )  # fmt: skip
    return out if status == 0 else None
