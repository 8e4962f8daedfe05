"""The offload folder's state: a killed rewrite, two loads sharing it, a read-only one, replaced files."""

import errno
import fcntl
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
import torch

import lamina
from lamina.errors import InvalidArgumentError
from lamina.placement import offload_store
from lamina.placement.offload_store import INDEX, LOCK
from tests.placement.toy_models import Toy, block_bytes

ROOT = Path(__file__).resolve().parents[2]
D = 32
EMB = 50 * D * 4
BLOCK = block_bytes(D)
BUDGET = (EMB + 4 * BLOCK) // 2 - 1  # in 16 bits: some blocks on disk, converted into the folder
IDS = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(1))


def empty_toy() -> Toy:
    with lamina.init_empty():
        return Toy(d=D)


def load(ckpt, off, dtype, model=None):
    model = empty_toy() if model is None else model
    return lamina.load_and_dispatch(
        model, ckpt, max_memory={"cpu": BUDGET}, offload_dir=off, dtype=dtype
    ).eval()


def expected(reference, dtype):
    in_memory = Toy(d=D).to(getattr(torch, dtype)).eval()
    in_memory.load_state_dict(reference.state_dict())
    with torch.no_grad():
        return in_memory(IDS)


def output(model):
    with torch.no_grad():
        return model(IDS)


KILLED_REWRITE = r"""
import os, signal, sys
import lamina
from lamina.placement import offload_store
from tests.placement.toy_models import Toy

ckpt, off, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
save, calls = offload_store.save_file, []

def save_then_die(tensors, path):
    calls.append(path)
    if len(calls) == 2:  # one layer file already replaced: killed as by the OOM killer
        os.kill(os.getpid(), signal.SIGKILL)
    save(tensors, path)

offload_store.save_file = save_then_die
with lamina.init_empty():
    model = Toy(d=32)
lamina.load_and_dispatch(model, ckpt, max_memory={"cpu": budget}, offload_dir=off, dtype="float16")
"""


def test_a_rewrite_killed_midway_leaves_no_index_and_the_next_run_writes_again(reference, ckpt_dir, tmp_path):
    off = tmp_path / "off"
    load(ckpt_dir, off, "bfloat16")
    assert (off / INDEX).exists()
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_REWRITE, str(ckpt_dir), str(off), str(BUDGET)],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9, killed.stderr
    # One layer file is float16 now (the same size as in bfloat16): the bfloat16 index must be gone.
    assert not (off / INDEX).exists()
    assert torch.equal(output(load(ckpt_dir, off, "bfloat16")), expected(reference, "bfloat16"))


def test_two_loads_sharing_a_folder_take_turns(reference, ckpt_dir, tmp_path, monkeypatch):
    """A (bfloat16) pauses after writing its first layer file; B (float16, same folder) starts then.
    B must wait for A's lock: without it, B writes the whole folder and A finishes with B's file."""
    off = tmp_path / "off"
    first_written, b_done = threading.Event(), threading.Event()
    lock_held = []
    save = offload_store.save_file

    def save_and_pause(tensors, path):
        save(tensors, path)
        if not first_written.is_set():
            fd = (off / LOCK).open("rb")  # a new open file description: flock conflicts across them
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                lock_held.append(False)
            except BlockingIOError:
                lock_held.append(True)
            finally:
                fd.close()
            first_written.set()
            b_done.wait(timeout=1.5)  # B cannot finish while A holds the lock

    monkeypatch.setattr(offload_store, "save_file", save_and_pause)
    models = {"bfloat16": empty_toy(), "float16": empty_toy()}  # init_empty is not for threads
    results, errors = {}, []

    def run(dtype, wait_for=None, done=None):
        try:
            if wait_for is not None:
                wait_for.wait(timeout=30)
            results[dtype] = output(load(ckpt_dir, off, dtype, models[dtype]))
        except Exception as exc:  # reported below, with the thread's result
            errors.append(exc)
        finally:
            if done is not None:
                done.set()

    a = threading.Thread(target=run, args=("bfloat16",))
    b = threading.Thread(target=run, args=("float16", first_written, b_done))
    with pytest.warns(UserWarning, match=rf"offload dir {off} is in use by another Lamina process; waiting"):
        a.start()
        b.start()
        a.join(timeout=60)
        b.join(timeout=60)
    assert not errors, errors
    assert lock_held == [True]
    assert torch.equal(results["bfloat16"], expected(reference, "bfloat16"))
    assert torch.equal(results["float16"], expected(reference, "float16"))


def test_streamed_layers_survive_another_process_rewriting_the_folder(reference, ckpt_dir, tmp_path):
    """A loaded model keeps running on the files it mapped when another load replaces them (here for
    another dtype): layers read from disk come from the mapping, not from the new file at that path."""
    off = tmp_path / "off"
    model = load(ckpt_dir, off, "bfloat16")
    load(ckpt_dir, off, "float16")  # rewrites every layer file of the folder
    model.lamina_streamer.resident = [lambda: False] * len(model.lamina_streamer.layers)  # read them all
    want = expected(reference, "bfloat16")
    for _ in range(2):  # the second pass is read with O_DIRECT where the file system has it
        assert torch.equal(output(model), want)


def _read_only(monkeypatch):
    """What a read-only folder does to the writability probe (root ignores permission bits)."""

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(offload_store, "tempfile", types.SimpleNamespace(TemporaryFile=refuse))


def test_a_complete_folder_is_used_read_only(reference, ckpt_dir, tmp_path, monkeypatch):
    off = tmp_path / "off"
    load(ckpt_dir, off, "bfloat16")
    stamp = {p: p.stat().st_mtime_ns for p in off.iterdir()}
    _read_only(monkeypatch)
    assert torch.equal(output(load(ckpt_dir, off, "bfloat16")), expected(reference, "bfloat16"))
    assert {p: p.stat().st_mtime_ns for p in off.iterdir()} == stamp
    # A folder that must be written (another dtype) is still refused, before any file changes.
    with pytest.raises(InvalidArgumentError, match=rf"offload dir {off} is not writable \(Read-only file"):
        load(ckpt_dir, off, "float16")
    assert {p: p.stat().st_mtime_ns for p in off.iterdir()} == stamp
