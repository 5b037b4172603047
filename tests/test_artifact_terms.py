"""The one decoder of artifact terms (`didi.artifact.parse_terms`/`decode_terms`).

Every term kind decodes to the delta an independent dense formula gives, written here from the raw tensors;
a term file with a kind it may not hold is refused with the same DidiError by `Artifact.task_deltas`, by
routing and by export, since all three read terms through the decoder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from didi.artifact import Dense, LoRA, Masked, decode_terms, load_artifact, write_artifact
from didi.errors import DidiError
from didi.sources import file_sha256

W1, W2, B1 = "fc1.weight", "fc2.weight", "fc1.bias"


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def terms_artifact(tmp_path):
    """fold (plain names), shared (lora pair, dense, ref), task files (lora, dense, mask + scale), a group."""
    from didi.backbones import Adapter

    g = _g(0)
    base = {
        W1: torch.randn(6, 4, generator=g),
        B1: torch.randn(6, generator=g),
        W2: torch.randn(3, 6, generator=g),
    }
    save_file(base, str(tmp_path / "base.safetensors"))
    fold = {W2: torch.randn(3, 6, generator=g)}
    shared = {
        f"{W1}::lora_A": torch.randn(6, 2, generator=g),
        f"{W1}::lora_B": torch.randn(2, 4, generator=g),
        f"{B1}::dense": torch.randn(6, generator=g),
        f"{W2}::ref": torch.randn(3, 6, generator=g),
    }
    tasks = {
        "a": {
            f"{W1}::lora_A": torch.randn(6, 1, generator=g),
            f"{W1}::lora_B": torch.randn(1, 4, generator=g),
            f"{W2}::mask": (torch.rand(3, 6, generator=g) > 0.5).float(),
            f"{W2}::scale": torch.tensor(0.7),
            f"{B1}::dense": torch.randn(6, generator=g),
        },
        "b": {f"{W2}::dense": torch.randn(18, generator=g)},
    }  # a dense term stored flat
    groups = {
        "ab": (
            ["a", "b"],
            {
                f"{W1}::lora_A": torch.randn(6, 3, generator=g),
                f"{W1}::lora_B": torch.randn(3, 4, generator=g),
                f"{W2}::dense": torch.randn(3, 6, generator=g),
            },
        )
    }
    manifest = {
        "method": {"name": "handmade"},
        "adapter": {"name": Adapter.registry_name, "settings": {}},
        "sources": {"base": {"path": str(tmp_path / "base.safetensors")}},
        "tasks": list(tasks),
        "base_params": sum(v.numel() for v in base.values()),
        "tensors": {
            k: {"shape": list(v.shape), "dtype": "float32", "matrix_shape": None} for k, v in base.items()
        },
    }
    path = write_artifact(tmp_path / "art", manifest, fold, shared, tasks, groups=groups)
    return path, base, fold, shared, tasks, groups


def _expected(base, fold, shared, tasks, groups, task: str) -> dict[str, torch.Tensor]:
    """θ_t − θ0 written out by hand, term kind by term kind."""
    own, grp = tasks[task], groups["ab"][1]
    d = {
        W1: shared[f"{W1}::lora_A"] @ shared[f"{W1}::lora_B"] + grp[f"{W1}::lora_A"] @ grp[f"{W1}::lora_B"],
        B1: shared[f"{B1}::dense"].clone(),
        W2: fold[W2] + grp[f"{W2}::dense"],
    }
    if task == "a":
        d[W1] = d[W1] + own[f"{W1}::lora_A"] @ own[f"{W1}::lora_B"]
        d[B1] = d[B1] + own[f"{B1}::dense"]
        d[W2] = d[W2] + own[f"{W2}::scale"] * own[f"{W2}::mask"] * shared[f"{W2}::ref"]
    else:
        d[W2] = d[W2] + own[f"{W2}::dense"].reshape(3, 6)
    return d


def test_decode_gives_typed_terms_in_key_order(terms_artifact):
    _, _, fold, shared, tasks, _ = terms_artifact
    own = tasks["a"]
    decoded = decode_terms(own, "tasks/a.safetensors", "expert", refs=shared)
    assert sorted(decoded) == sorted([W1, W2, B1])
    (lora,), (masked,), (dense,) = decoded[W1], decoded[W2], decoded[B1]
    assert isinstance(lora, LoRA) and isinstance(masked, Masked) and isinstance(dense, Dense)
    torch.testing.assert_close(lora.delta((6, 4)), own[f"{W1}::lora_A"] @ own[f"{W1}::lora_B"])
    torch.testing.assert_close(
        masked.delta((3, 6)), own[f"{W2}::scale"] * own[f"{W2}::mask"] * shared[f"{W2}::ref"]
    )
    assert decode_terms(fold, "fold.safetensors", "fold")[W2][0].value is fold[W2]  # fold keys: tensor names
    shared_terms = decode_terms(shared, "shared.safetensors", "shared")
    assert set(shared_terms) == {W1, B1}  # "::ref" is what masks read, not a term of its own


def test_every_kind_equals_the_dense_formula(terms_artifact):
    path, base, fold, shared, tasks, groups = terms_artifact
    art = load_artifact(path)
    for t in ("a", "b"):
        got, want = art.task_deltas(t), _expected(base, fold, shared, tasks, groups, t)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], msg=f"task {t}, tensor {k}")
    common = art.common_deltas()
    torch.testing.assert_close(common[W1], shared[f"{W1}::lora_A"] @ shared[f"{W1}::lora_B"])
    torch.testing.assert_close(common[W2], fold[W2])


@pytest.mark.parametrize(
    "terms, match",
    [
        ({f"{W1}::lora_A": torch.zeros(6, 1)}, rf"'{W1}::lora_A' needs '{W1}::lora_B'"),
        ({f"{W1}::lora_B": torch.zeros(1, 4)}, rf"'{W1}::lora_B' needs '{W1}::lora_A'"),
        ({f"{W2}::mask": torch.ones(3, 6)}, rf"'{W2}::mask' needs '{W2}::scale'"),
        ({f"{W2}::scale": torch.tensor(1.0)}, rf"'{W2}::scale' needs '{W2}::mask'"),
        ({f"{B1}::mask": torch.ones(6), f"{B1}::scale": torch.tensor(1.0)}, rf"needs '{B1}::ref' in shared"),
        ({f"{W2}::ref": torch.ones(3, 6)}, rf"unknown term kind 'ref' in '{W2}::ref'"),
        ({W2: torch.ones(3, 6)}, rf"unknown term kind '' in '{W2}'"),
    ],
)
def test_bad_expert_terms_name_the_file_and_key(terms, match):
    refs = {f"{W2}::ref": torch.ones(3, 6)}
    with pytest.raises(DidiError, match=r"^tasks/x\.safetensors: .*" + match):
        decode_terms(terms, "tasks/x.safetensors", "expert", refs=refs)


def test_a_mask_in_the_shared_file_is_refused():
    with pytest.raises(DidiError, match=rf"shared\.safetensors: unknown term kind 'mask' in '{W2}::mask'"):
        decode_terms(
            {
                f"{W2}::mask": torch.ones(3, 6),
                f"{W2}::scale": torch.tensor(1.0),
                f"{W2}::ref": torch.ones(3, 6),
            },
            "shared.safetensors",
            "shared",
        )


def _with_bogus_term(path: Path) -> Path:
    """The artifact with an unknown term kind added to task a's file (written past write_artifact, which
    prices every key by its kind and would refuse it); the manifest's checksum is updated to match."""
    f = path / "tasks" / "a.safetensors"
    terms = load_file(str(f))
    terms[f"{W1}::bogus"] = torch.zeros(6, 4)
    save_file(terms, str(f))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["tasks/a.safetensors"] = file_sha256(f)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_unknown_kind_is_one_error_for_task_deltas_routing_and_export(terms_artifact, tmp_path):
    from torch import nn

    from didi.backbones import Adapter
    from didi.export import export_artifact
    from didi.routing import RoutedModel

    path, *_ = terms_artifact
    bad = _with_bogus_term(Path(shutil.copytree(path, tmp_path / "bad")))
    art = load_artifact(bad)
    messages = []
    with pytest.raises(DidiError) as e:
        art.task_deltas("a")
    messages.append(str(e.value))
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(4, 6))
    model.add_module("fc2", nn.Linear(6, 3, bias=False))
    with pytest.raises(DidiError) as e:
        RoutedModel(model, art, adapter=Adapter())
    messages.append(str(e.value))
    with pytest.raises(DidiError) as e:
        export_artifact(bad, tmp_path / "exported")
    messages.append(str(e.value))
    assert not (tmp_path / "exported").exists()
    assert messages[0] == messages[1] == messages[2], messages
    assert messages[0].startswith(
        f"{bad / 'tasks' / 'a.safetensors'}: unknown term kind 'bogus' in '{W1}::bogus'"
    )
    art.task_deltas("b")  # the other task's terms are fine


def test_export_and_task_deltas_agree_bit_for_bit(terms_artifact, tmp_path):
    from didi.export import export_artifact

    path, base, *_ = terms_artifact
    out = export_artifact(path, tmp_path / "ckpt")
    art = load_artifact(path)
    for t in ("a", "b"):
        written, expected = load_file(str(out / f"{t}.safetensors")), art.task_state_dict(t, base=base)
        assert written.keys() == expected.keys()
        assert all(torch.equal(written[k], v) for k, v in expected.items())
