"""The fast, deterministic parts of the fault drills (benchmarks/fault_drills.py runs the slow ones on real
`didi merge` processes): a corrupted factor-store file is caught by its checksum and recomputed, a tampered
artifact is refused by `load_artifact` and `didi inspect --verify`, concurrent writers of one output or one
store end with one result and a clean error, and temporary directories of killed writers are swept."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import didi.decompose as dec
from didi.artifact import atomic_dir, load_artifact, sweep_stale_temps, write_artifact
from didi.backbones import Adapter, Zoo
from didi.cli import main
from didi.decompose import CorruptStore, FactorStore, decompose
from didi.errors import DidiError
from didi.sources import file_sha256


@pytest.fixture
def store_setup(tmp_path, tiny_zoo, fast, monkeypatch):
    """A factor store of the tiny zoo, and a fresh per-process memo of verified stores (as a new process
    would have: this one verified the store when it wrote it)."""
    monkeypatch.setattr(dec, "_VERIFIED", set())
    zoo = Zoo(Adapter(), *tiny_zoo)
    store = decompose(zoo, fast[0], progress=False)
    dec._VERIFIED.clear()
    return zoo, fast[0], store


def _flip_mid_data(f: Path) -> None:
    """Flip 4 bytes in the middle of a safetensors file's tensor data: it still loads, with wrong numbers."""
    raw = bytearray(f.read_bytes())
    at = (8 + int.from_bytes(raw[:8], "little") + len(raw)) // 2
    for i in range(at, at + 4):
        raw[i] ^= 0xFF
    f.write_bytes(bytes(raw))


def test_store_records_a_checksum_per_file(store_setup):
    _, _, store = store_setup
    files = sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*.safetensors"))
    assert sorted(store.meta["file_sha256"]) == files and files
    assert all(file_sha256(store.root / rel) == h for rel, h in store.meta["file_sha256"].items())


def test_corrupted_store_file_is_detected_and_recomputed(store_setup):
    zoo, cfg, store = store_setup
    f = store.root / "matrices" / "00000.safetensors"
    good, factors = file_sha256(f), {k: v.clone() for k, v in load_file(str(f)).items()}
    _flip_mid_data(f)
    load_file(str(f))  # the damage is silent to the reader: only the checksum sees it
    with pytest.raises(CorruptStore, match="00000.safetensors: sha256 does not match"):
        FactorStore(store.root)
    with pytest.warns(UserWarning, match="sha256 does not match.*deleted and recomputed"):
        again = decompose(zoo, cfg, progress=False)
    assert again.root == store.root and file_sha256(f) == good
    assert all(torch.equal(v, load_file(str(f))[k]) for k, v in factors.items())
    assert not [p.name for p in store.root.parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("damage", ["missing file", "unreadable index"])
def test_damaged_store_is_recomputed(store_setup, damage):
    zoo, cfg, store = store_setup
    if damage == "missing file":
        (store.root / "matrices" / "00001.safetensors").unlink()
    else:
        (store.root / "index.json").write_text('{"store_version": 3, "tas')
    with pytest.warns(UserWarning, match="recomputed"):
        again = decompose(zoo, cfg, progress=False)
    again.verify()
    assert (store.root / "matrices" / "00001.safetensors").exists()


def test_concurrent_decompositions_share_one_store(tmp_path, tiny_zoo, fast, monkeypatch):
    """Two processes decompose into one cache at once: the one whose rename comes second uses the first
    one's store (its own is discarded) instead of failing. Simulated in-process: a second decomposition
    completes while the first is between computing and renaming."""
    zoo = Zoo(Adapter(), *tiny_zoo)
    real = dec.assemble
    calls = []

    def racing(*a, **k):
        real(*a, **k)
        calls.append(1)
        if len(calls) == 1:
            decompose(zoo, fast[0], progress=False)  # the other process finishes first

    monkeypatch.setattr(dec, "assemble", racing)
    store = decompose(zoo, fast[0], progress=False)
    assert len(calls) == 2
    dec._VERIFIED.clear()
    FactorStore(store.root)  # the store in place verifies
    assert [p.name for p in store.root.parent.iterdir()] == [store.root.name]


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_temp_dirs_of_killed_writers_are_swept(tmp_path, tiny_zoo, fast):
    """A kill -9 leaves the writer's temporary directory behind; the next writer of the same output (or
    store) removes it, but never one of a live process or another host's."""
    host = socket.gethostname()
    out = tmp_path / "art"
    dead = tmp_path / f".art.tmp-{_dead_pid()}-1-{host}"
    live = tmp_path / f".art.tmp-{os.getpid()}-2-{host}"
    other = tmp_path / f".art.tmp-{_dead_pid()}-3-elsewhere"
    for d in (dead, live, other):
        d.mkdir()
    write_artifact(out, {"tasks": ["a", "b"], "base_params": 10}, {}, {}, {})
    assert not dead.exists() and live.exists() and other.exists()
    assert sweep_stale_temps(out, ".") == []
    zoo = Zoo(Adapter(), *tiny_zoo)
    cache = Path(fast[0].cache_dir)
    root = decompose(zoo, fast[0], progress=False).root
    killed = root.with_name(f"{root.name}.tmp-{_dead_pid()}-4-{host}")
    (killed / "matrices").mkdir(parents=True)
    decompose(zoo, fast[0], progress=False)  # cached: it sweeps the leftover all the same
    assert [p.name for p in cache.iterdir()] == [root.name]


@pytest.fixture
def artifact(tmp_path) -> Path:
    """A small artifact written by `write_artifact` (the checks do not depend on how its terms came about)."""
    g = torch.Generator().manual_seed(0)
    tasks = {
        t: {"w::lora_A": torch.randn(8, 2, generator=g), "w::lora_B": torch.randn(2, 6, generator=g)}
        for t in ("a", "b")
    }
    shared = {"w::lora_A": torch.randn(8, 1, generator=g), "w::lora_B": torch.randn(1, 6, generator=g)}
    return write_artifact(tmp_path / "art", {"tasks": ["a", "b"], "base_params": 48}, {}, shared, tasks)


def test_tampered_artifact_is_refused(artifact, capsys):
    assert main(["inspect", str(artifact), "--verify", "true"]) == 0
    assert "all 3 files match" in capsys.readouterr().out
    f = artifact / "tasks" / "b.safetensors"
    t = load_file(str(f))
    t["w::lora_B"][0, 0] += 1.0  # one tensor, one element
    save_file(t, str(f))
    with pytest.raises(DidiError, match="tasks/b.safetensors: sha256 does not match"):
        load_artifact(artifact, verify=True)
    load_artifact(artifact, verify=False)  # without verification it loads: the checksum is what refuses it
    (artifact / "shared.safetensors").unlink()
    assert main(["inspect", str(artifact), "--verify", "true"]) == 2
    err = capsys.readouterr().err
    assert "2 file(s) fail verification" in err
    assert "tasks/b.safetensors: sha256 does not match" in err and "shared.safetensors listed in the" in err
    assert main(["inspect", str(artifact)]) == 2  # plain inspect refuses it too, at the first bad file


def test_concurrent_writers_of_one_output_one_wins(tmp_path):
    """Both writers passed the existence check; the second to rename fails with a DidiError, its temporary
    directory is removed and the first one's artifact is intact."""
    out = tmp_path / "art"
    manifest = {"tasks": ["a", "b"], "base_params": 10}
    first = {"w::dense": torch.ones(2)}
    with pytest.raises(DidiError, match="written by another process while this one was writing it"):
        with atomic_dir(out) as tmp:
            (tmp / "partial").write_text("the slower writer")
            write_artifact(out, manifest, {}, first, {})  # the faster writer completes meanwhile
    assert [p.name for p in tmp_path.iterdir()] == ["art"]
    art = load_artifact(out, verify=True)
    assert torch.equal(art.shared()["w::dense"], first["w::dense"])
    assert json.loads((out / "manifest.json").read_text())["tasks"] == ["a", "b"]
    with pytest.raises(DidiError, match="already exists"):  # a writer that starts later is refused at once
        write_artifact(out, manifest, {}, {}, {})


def test_a_second_run_on_a_locked_output_fails_cleanly(tmp_path, tiny_zoo, fast):
    """While one run holds an output's work directory, another merge of that output refuses at once (it used
    to refine into the first run's files), and leaves the first run's work directory alone."""
    import fcntl
    import os

    from didi.backbones import Adapter, Zoo
    from didi.errors import DidiError
    from didi.pipeline import MergeOptions, run_merge, work_dir_for

    base, tasks = tiny_zoo
    zoo = Zoo(Adapter(), base, tasks)
    out = tmp_path / "out"
    work = work_dir_for(out)
    work.mkdir()
    (work / "keep").write_text("the other run's file")
    fd = os.open(work / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the other run
    try:
        with pytest.raises(DidiError, match="another didi run is writing this output"):
            run_merge(zoo, out, MergeOptions(1.3, *fast), progress=False)
    finally:
        os.close(fd)
    assert (work / "keep").exists() and not out.exists()
    assert run_merge(zoo, out, MergeOptions(1.3, *fast), progress=False) == out  # the lock is free again
    assert not work.exists()
