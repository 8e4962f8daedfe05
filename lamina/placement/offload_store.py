"""The offload folder: disk-tier layers saved once, one safetensors file per layer, in the run dtype.

Used when the checkpoint cannot be streamed as it is (GGUF blocks, a dtype cast, `.bin`). Each
layer is written as soon as its tensors are complete, so at most one layer is held in memory; files
are written under a temporary name and renamed. A run that writes the folder first removes the old
index, before any file it describes is replaced, and writes the new index last, after the files are
on disk (fsync), so a run killed at any point (SIGKILL, power loss) leaves no folder that looks
complete. A later run whose source checkpoint, dtype, layer names and file sizes match the index
reuses the folder without reading the checkpoint's disk-tier tensors at all, and without writing to
it (a read-only folder is fine); a truncated or replaced file makes it write the folder again.

Processes sharing a folder take turns: an exclusive `flock` on `.lamina-offload.lock` in the folder
is held from the completeness check until the files are opened (their mappings stay valid after
that), so a second process waits, then finds the folder complete for its own key or writes it again.
Where `fcntl` does not exist (Windows), there is no lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lamina.errors import CheckpointError, InvalidArgumentError

try:
    import fcntl
except ImportError:  # Windows: no advisory file locks, so no lock
    fcntl = None  # type: ignore[assignment]

INDEX = "lamina-offload.json"
LOCK = ".lamina-offload.lock"


def default_offload_dir(source: Path, dtype: torch.dtype, blocks: bool = False) -> Path:
    """Per model file, dtype and layout: `$XDG_CACHE_HOME/lamina/offload/<name>-<dtype>[-blocks]`
    (`blocks`: a GGUF's quantized blocks kept, see `lamina.quant.gguf_stream`)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    name = f"{source.stem}-{str(dtype).removeprefix('torch.')}" + ("-blocks" if blocks else "")
    return cache / "lamina" / "offload" / name


def prepare_dir(path: str | os.PathLike[str] | None, probe: bool = True) -> Path:
    """Create `path` if needed; with `probe`, prove it writable. A clear error otherwise.

    Loading passes `probe=False` and probes (`check_writable`) only when it must write the folder,
    so a complete folder that is read-only is still used.
    """
    if path is None:
        raise InvalidArgumentError(
            "some layers are placed on disk and must be converted; pass offload_dir (--offload-dir) "
            "to a writable folder"
        )
    if not isinstance(path, str | os.PathLike):
        raise InvalidArgumentError(f"offload dir must be a folder path, got {type(path).__name__}")
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise InvalidArgumentError(
            f"offload dir {folder} is a file, not a folder; pass a folder to --offload-dir"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _not_writable(folder, exc) from None
    if probe:
        check_writable(folder)
    return folder


def check_writable(folder: Path) -> None:
    """Create and remove a file in `folder`; a one-line error if that fails."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise _not_writable(folder, exc) from None


def _not_writable(folder: Path, exc: OSError) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"offload dir {folder} is not writable ({exc.strerror or exc}); pass a writable --offload-dir"
    )


def _fsync(path: Path) -> None:
    """Flush the file `path` to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Flush `folder`'s entries (an unlink, a rename) to disk, where the system can (not Windows)."""
    with contextlib.suppress(OSError):
        _fsync(folder)


def _file_name(prefix: str) -> str:
    return f"{prefix or 'root'}.safetensors"


class OffloadFolder:
    """Writes and reopens the per-layer files of one model's disk tier."""

    def __init__(self, folder: Path, key: dict[str, Any], units: dict[str, list[str]]) -> None:
        self.folder = folder
        self.key = key  # source checkpoint and dtype this folder was made from
        self.units = units  # layer prefix -> the tensor names it stores
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.written: list[Path] = []

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock (waiting for another process that holds it) inside the block.

        Without `fcntl`, or where the lock file can neither be created nor opened (a read-only
        folder that has none: nothing can write it then either), the block runs unlocked.
        """
        fd = None
        if fcntl is not None:
            try:  # read-only and O_CREAT: also opens an existing lock file in a read-only folder
                fd = os.open(self.folder / LOCK, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError:
                fd = None
        try:
            if fd is not None:
                self._lock(fd)
            yield
        finally:
            if fd is not None:
                os.close(fd)  # releases the lock

    def _lock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            warnings.warn(
                f"offload dir {self.folder} is in use by another Lamina process; waiting for it",
                stacklevel=4,
            )
        except OSError:  # a file system without flock: go on unlocked
            return
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)

    def is_complete(self) -> bool:
        """Whether an earlier run already wrote this exact content."""
        try:
            index = json.loads((self.folder / INDEX).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return (
            index.get("key") == self.key
            and index.get("units") == self.units
            and index.get("sizes") == self._sizes()
        )

    def _sizes(self) -> dict[str, int | None]:
        """Each layer file's size now (None: missing): a truncated or replaced file fails the match,
        and the folder is written again."""
        sizes: dict[str, int | None] = {}
        for prefix in self.units:
            file = self.folder / _file_name(prefix)
            sizes[file.name] = file.stat().st_size if file.is_file() else None
        return sizes

    def begin(self) -> None:
        """Before writing: prove the folder writable, and remove the old index before any file it
        describes is replaced, so a run killed mid-write cannot leave a folder that looks complete."""
        check_writable(self.folder)
        try:
            (self.folder / INDEX).unlink(missing_ok=True)
            _fsync_dir(self.folder)
        except OSError as exc:
            raise _not_writable(self.folder, exc) from None

    def add(self, prefix: str, name: str, tensor: torch.Tensor) -> None:
        """Hold one tensor of a layer; write the layer's file once all of its tensors arrived."""
        layer = self.pending.setdefault(prefix, {})
        layer[name] = tensor.contiguous()
        if len(layer) == len(self.units[prefix]):
            self._write(prefix, self.pending.pop(prefix))

    def _write(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        final = self.folder / _file_name(prefix)
        tmp = final.with_name(final.name + ".tmp")
        try:
            save_file(tensors, str(tmp))
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            self.abort()
            raise InvalidArgumentError(
                f"cannot write offload file {final} ({exc.strerror or exc}); free disk space or pass "
                "another --offload-dir"
            ) from None
        self.written.append(final)

    def finish(self) -> None:
        """Write the index that marks the folder complete, once every file is on disk."""
        missing = sorted(self.pending)
        if missing:
            self.abort()
            raise InvalidArgumentError(f"the checkpoint lacks tensors of {missing[0]}; it is incomplete")
        index = {"key": self.key, "units": self.units, "sizes": self._sizes()}
        final = self.folder / INDEX
        tmp = final.with_name(final.name + ".tmp")
        try:
            for path in self.written:
                _fsync(path)
            tmp.write_text(json.dumps(index, indent=1), encoding="utf-8")
            _fsync(tmp)
            os.replace(tmp, final)
            _fsync_dir(self.folder)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
            self.abort()
            raise InvalidArgumentError(
                f"cannot write offload index {final} ({exc.strerror or exc}); free disk space or pass "
                "another --offload-dir"
            ) from None

    def abort(self) -> None:
        """Remove what this run wrote, so no half-written folder is left behind."""
        for path in self.written:
            path.unlink(missing_ok=True)
        self.written.clear()
        self.pending.clear()

    def open(self) -> dict[str, tuple[Path, torch.Tensor]]:
        """Every stored tensor by name, with its file, memory-mapped (the page cache holds them, not
        the process)."""
        out: dict[str, tuple[Path, torch.Tensor]] = {}
        for prefix in self.units:
            file = self.folder / _file_name(prefix)
            try:
                with safe_open(str(file), framework="pt") as handle:
                    out.update({name: (file, handle.get_tensor(name)) for name in self.units[prefix]})
            except (OSError, SafetensorError) as exc:
                raise CheckpointError(
                    f"offload file {file} is damaged ({' '.join(str(exc).split())}); delete {self.folder} "
                    "to have it written again"
                ) from None
        return out
