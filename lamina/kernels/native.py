"""Build and load Lamina's native CPU kernels (C sources in this package) on first use.

The kernels are plain C written once against `simd.h`'s 16-lane vectors and built for the best
instruction set the CPU has: AVX-512 with VNNI (Zen 4, Xeons since Cascade Lake) or AVX2 with FMA
and F16C (Intel client CPUs since Haswell, Zen 1-3: most laptops). Both builds give bit-identical
results. The system C compiler builds a shared library cached under `~/.cache/lamina/kernels` (or
`$LAMINA_CACHE_DIR/kernels`), keyed by a hash of the sources, the flags and the compiler, loaded with
ctypes. Building takes about a second; every later process loads the cached file. The library's
OpenMP calls resolve to the libgomp that torch has already loaded (same soname), so both share one
thread pool and `torch.set_num_threads`.

`LAMINA_NATIVE_KERNELS=0` turns them off and `=avx2` (or `=avx512`) picks a build; `1` or unset means
the best build, and any other value is refused with an error. When the CPU has
neither instruction set (ARM, older x86), no C compiler is found or the build fails, `library()`
returns None and callers keep their torch kernels; `unavailable_reason()` says why.
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

from lamina.errors import InvalidArgumentError

SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in ("blockq.c", "llm_int8.c", "dense.c", "attention.c", "llama_layer.c", "hqq.c")
)
HEADERS = tuple(Path(__file__).with_name(name) for name in ("simd.h", "vector_math.h"))
FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off")
#: The builds, best first: instruction set -> (compiler flags, /proc/cpuinfo flags the code needs).
ISAS = {
    "avx512": (
        ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-mf16c"),
        ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "fma", "f16c"),
    ),
    "avx2": (("-mavx2", "-mfma", "-mf16c"), ("avx2", "fma", "f16c")),
}
DISABLE_ENV = "LAMINA_NATIVE_KERNELS"

_reason: list[str] = []  # why `library()` returned None, once it has


def cache_dir() -> Path:
    """Where built kernels are kept."""
    root = os.environ.get("LAMINA_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "lamina") / "kernels"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(
        next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    )


def supported_isas() -> list[str]:
    """The builds this CPU can run (Linux /proc/cpuinfo), best first."""
    flags = _cpu_flags()
    return [isa for isa, (_, needs) in ISAS.items() if flags.issuperset(needs)]


def cpu_supported() -> bool:
    """Whether this CPU can run some build of the kernels."""
    return bool(supported_isas())


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)


def _build(compiler: str, isa: str) -> Path:
    """Compile the sources for `isa` into the cache (atomically: a temporary file renamed into place)."""
    flags = (*FLAGS, *ISAS[isa][0])
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    sources = b"".join(source.read_bytes() for source in (*SOURCES, *HEADERS))
    key = hashlib.sha256(sources + " ".join(flags).encode() + version.encode()).hexdigest()[:16]
    target = cache_dir() / f"lamina-kernels-{isa}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run(
            [compiler, *flags, *map(str, SOURCES), "-o", str(built)], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip().splitlines()[-1:]}")
        os.replace(built, target)
    return target


def turned_off() -> bool:
    """Whether the user turned the kernels off (`LAMINA_NATIVE_KERNELS=0`)."""
    return os.environ.get(DISABLE_ENV, "") == "0"


def selected_isa() -> str | None:
    """The build `library()` loads: the one `LAMINA_NATIVE_KERNELS` names, else the best this CPU runs;
    None when turned off or when the CPU runs none (`unavailable_reason()` says which). Another value
    of the variable is an error."""
    choice = os.environ.get(DISABLE_ENV, "")
    if choice not in ("", "1", "0", *ISAS):
        raise InvalidArgumentError(
            f"{DISABLE_ENV}={choice!r} is not a setting; use 0 (off), {' or '.join(ISAS)}, or leave it unset"
        )
    if turned_off():
        _reason.append(f"disabled by {DISABLE_ENV}=0")
        return None
    supported = supported_isas()
    if choice in ISAS:
        if choice not in supported:
            missing = [flag for flag in ISAS[choice][1] if flag not in _cpu_flags()]
            _reason.append(f"{DISABLE_ENV}={choice} but this CPU lacks {', '.join(missing)}")
            return None
        return choice
    if not supported:
        _reason.append("this CPU has neither AVX-512 VNNI nor AVX2 with FMA and F16C")
        return None
    return supported[0]


@functools.cache
def load(isa: str) -> ctypes.CDLL | None:
    """The kernel library built for `isa` (a key of ISAS), or None when it cannot be built here."""
    compiler = _compiler()
    if compiler is None:
        _reason.append("no C compiler (cc, gcc or clang) found")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler, isa)))
    except (OSError, RuntimeError) as err:
        _reason.append(f"building the kernels failed: {err}")
        return None
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.lamina_blockq_matmul.argtypes = [pointer, i64, i64, pointer, pointer, pointer, i64, i32, i32, pointer, i32, pointer, i64]  # fmt: skip
    lib.lamina_blockq_matmul.restype = ctypes.c_int
    lib.lamina_llm_int8_matmul.argtypes = [pointer, i64, i64, pointer, pointer, pointer, i64, ctypes.c_float, pointer, i64]  # fmt: skip
    lib.lamina_llm_int8_matmul.restype = ctypes.c_int
    lib.lamina_decode_attention.argtypes = [pointer, i64, i64, i64, pointer, pointer, i64, i64, i64]
    lib.lamina_decode_attention.argtypes += [i64] * 7 + [ctypes.c_float, pointer]
    lib.lamina_decode_attention.restype = ctypes.c_int
    lib.lamina_dense_linear.argtypes = [pointer, i64, i64, pointer, i64, pointer, pointer, i64, i32]
    lib.lamina_dense_linear.restype = None
    lib.lamina_e4m3_linear.argtypes = [
        pointer,
        i64,
        i64,
        pointer,
        i64,
        pointer,
        i64,
        i64,
        pointer,
        pointer,
        i64,
    ]
    lib.lamina_e4m3_linear.restype = None
    lib.lamina_llama_layer.argtypes = [pointer, pointer, i64, i64, pointer, pointer, pointer, pointer, i64, i64, i64]  # fmt: skip
    lib.lamina_llama_layer.restype = ctypes.c_int
    lib.lamina_hqq_zeros.argtypes = [pointer, i64, i64, pointer, pointer, i32] + [ctypes.c_float] * 3
    lib.lamina_hqq_zeros.restype = ctypes.c_int
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None when it cannot be used here (see `unavailable_reason`)."""
    isa = selected_isa()
    return None if isa is None else load(isa)


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
    if status == -2:
        raise ValueError(
            f"blockq matmul: no kernel for {bits}-bit codes with {k // d.shape[1]} weights a scale"
        )
    if status != 0:
        raise MemoryError(f"blockq matmul: no memory for the quantized activations ({rows} x {k})")
    return y


def llm_int8_matmul(
    x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor, scales: torch.Tensor, threshold: float
) -> torch.Tensor:
    """LLM.int8(): y [M, N] float32 = x [M, K] float32 (contiguous) times an int8 weight in 8-bit tiles
    (`codes`, `d` as `blockq_matmul` takes them, offset 128) with `scales` [N] float32 its row scales;
    x's columns with any |x| >= `threshold` in float, the rest per-row int8 (llm_int8.c). Needs
    `library()`."""
    rows, k = x.shape
    n = scales.shape[0]
    y = torch.empty(rows, n, dtype=torch.float32)
    status = library().lamina_llm_int8_matmul(
        x.data_ptr(),
        rows,
        k,
        codes.data_ptr(),
        d.data_ptr(),
        scales.data_ptr(),
        n,
        threshold,
        y.data_ptr(),
        n,
    )
    if status != 0:
        raise MemoryError(f"LLM.int8 matmul: no memory for the quantized activations ({rows} x {k})")
    return y


#: Weight dtypes `dense_linear` takes -> the kernel's kind (dense.c).
DENSE_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def dense_kernel_takes(weight: torch.Tensor) -> bool:
    """Whether `dense_linear` multiplies this weight: contiguous float32, or fp16 / bfloat16 with a
    width a multiple of 16."""
    if weight.dtype not in DENSE_KINDS or not weight.is_contiguous():
        return False
    return weight.dtype == torch.float32 or weight.shape[1] % 16 == 0


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ weight [N, K]^T + bias on the CPU kernel (needs `library()`): x, bias and y
    float32, the weight float32, fp16 or bfloat16 (16-bit: K a multiple of 16), all contiguous; each
    row computed alone, as a one-row call would, and a 16-bit weight exactly as its float32 widening."""
    rows, k = x.shape
    n = weight.shape[0]
    y = torch.empty(rows, n, dtype=torch.float32)
    bias_ptr = None if bias is None else bias.data_ptr()
    kind = DENSE_KINDS[weight.dtype]
    library().lamina_dense_linear(
        x.data_ptr(), rows, k, weight.data_ptr(), n, bias_ptr, y.data_ptr(), n, kind
    )
    return y


def e4m3_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    scale_block: tuple[int, int],
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ (weight * scales)^T + bias on the CPU kernel (needs `library()`): weight
    float8 e4m3 [N, K] (K a multiple of 16), scales float32 [ceil(N / rows), ceil(K / cols)] for
    `scale_block` (rows, cols) (cols a multiple of 16), x, bias and y float32, all contiguous; each row
    computed alone, as a one-row call would."""
    rows, k = x.shape
    n = weight.shape[0]
    y = torch.empty(rows, n, dtype=torch.float32)
    library().lamina_e4m3_linear(
        x.data_ptr(), rows, k, weight.data_ptr(), n, scales.data_ptr(), *scale_block,
        None if bias is None else bias.data_ptr(), y.data_ptr(), n,
    )  # fmt: skip
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
    if keys.stride() != values.stride():  # views of one fused q/k/v output, no cache: a few rows to copy
        keys, values = keys.contiguous(), values.contiguous()
    if q.stride(-1) != 1 or keys.stride(-1) != 1:
        return None
    out = torch.empty(batch, rows, heads, dim, dtype=torch.float32)
    status = lib.lamina_decode_attention(
        q.data_ptr(), q.stride(0), q.stride(1), q.stride(2),
        keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1), keys.stride(2),
        batch, rows, heads, keys.shape[1], dim, start, window, scale, out.data_ptr(),
    )  # fmt: skip
    return out if status == 0 else None


def hqq_zeros(
    weight: torch.Tensor,
    inverse: torch.Tensor,
    zero: torch.Tensor,
    iters: int,
    beta: float,
    p: float,
    no_shrink_below: float,
) -> int:
    """HQQ's zero-point steps (hqq.c, `lamina.quant.hqq`) on weight [M, G] float32 (G a multiple of 16),
    inverse and zero [M, 1] float32, all contiguous: `zero` is updated in place; returns the steps
    taken. Needs `library()`."""
    steps = library().lamina_hqq_zeros(
        weight.data_ptr(), weight.shape[0], weight.shape[1], inverse.data_ptr(), zero.data_ptr(),
        iters, beta, p, no_shrink_below,
    )  # fmt: skip
    if steps < 0:
        raise MemoryError(f"HQQ zero points: no memory for the error sums of {weight.shape[0]} groups")
    return steps
