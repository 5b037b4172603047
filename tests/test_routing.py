"""Routed inference equals running each example through its own materialised task model.

The reference is `Artifact.task_state_dict` (θ0 + fold + shared + the task's terms, written by the artifact
module, not by routing.py) loaded into a plain copy of the model; each example runs alone through it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from didi.artifact import load_artifact, write_artifact
from didi.backbones import Adapter
from didi.errors import DidiError
from didi.routing import OracleRouter, RoutedLayerNorm, RoutedLinear, RoutedModel


class TinyNet(nn.Module):
    """Linear → LayerNorm → Linear, plus a free parameter (not inside a wrappable module)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 4)
        self.offset = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return scale * self.fc2(torch.relu(self.norm(self.fc1(x)))) + self.offset


def make_artifact(
    path,
    base_sd: dict,
    fold: dict,
    shared: dict,
    tasks: dict[str, dict],
    adapter="state_dict",
    settings=None,
    base_path: str = "unused",
    groups=None,
) -> object:
    tensors = {
        n: {"shape": list(v.shape), "dtype": "float32", "matrix_shape": None} for n, v in base_sd.items()
    }
    manifest = {
        "method": {"name": "test"},
        "adapter": {"name": adapter, "settings": settings or {}},
        "sources": {"base": {"path": base_path}},
        "tasks": list(tasks),
        "base_params": sum(v.numel() for v in base_sd.values()),
        "tensors": tensors,
    }
    write_artifact(path, manifest, fold, shared, tasks, groups=groups)
    return load_artifact(path)


def lowrank_terms(g, name, m, n, r, scale=0.3):
    return {
        f"{name}::lora_A": scale * torch.randn(m, r, generator=g),
        f"{name}::lora_B": torch.randn(r, n, generator=g),
    }


def per_example_reference(model, artifact, base_sd, x, ids, **kw):
    outs = []
    for i in range(x.shape[0]):
        ref = copy.deepcopy(model)
        ref.load_state_dict(artifact.task_state_dict(artifact.tasks[int(ids[i])], base=base_sd))
        outs.append(ref(x[i : i + 1], **kw))
    return torch.cat(outs)


@pytest.fixture
def tiny(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = TinyNet().eval()
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, base_sd, g, tmp_path


def test_mixed_batch_lowrank_equals_materialised(tiny):
    model, base_sd, g, tmp = tiny
    shared = {**lowrank_terms(g, "fc1.weight", 16, 8, 2), **lowrank_terms(g, "fc2.weight", 4, 16, 1)}
    tasks = {
        f"t{j}": {**lowrank_terms(g, "fc1.weight", 16, 8, j + 1), **lowrank_terms(g, "fc2.weight", 4, 16, 2)}
        for j in range(3)
    }
    tasks["t2"] = {}  # a task with no expert at all (rank 0 everywhere)
    fold = {
        "norm.weight": 0.1 * torch.randn(16, generator=g),
        "fc1.bias": 0.1 * torch.randn(16, generator=g),
        "fc2.weight": 0.1 * torch.randn(4, 16, generator=g),
    }  # a dense shared part folded (shared: folded)
    art = make_artifact(tmp / "a", base_sd, fold, shared, tasks)
    routed = RoutedModel(copy.deepcopy(model), art, adapter=Adapter())
    assert set(routed.routed) == {"fc1", "fc2"} and not routed.swapped  # pure low-rank: one pass
    assert all(isinstance(m, RoutedLinear) for m in routed.routed.values())
    x = torch.randn(10, 8, generator=g)
    ids = torch.tensor([0, 1, 2, 1, 0, 0, 2, 1, 1, 0])
    expect = per_example_reference(model, art, base_sd, x, ids, scale=2.0)
    got = routed(x, scale=2.0, task_ids=ids)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
    # the task really matters: routing everything to task 0 gives different outputs
    assert not torch.allclose(
        routed(x, scale=2.0, task_ids=torch.zeros(10, dtype=torch.long)), expect, atol=1e-3
    )
    # one-task batches: fast path (materialised) == row-wise routing == reference
    one = torch.full((10,), 1)
    fast = routed(x, scale=2.0, task_ids=one)
    routed.fast_path = False
    slow = routed(x, scale=2.0, task_ids=one)
    routed.fast_path = True
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        fast, per_example_reference(model, art, base_sd, x, one, scale=2.0), atol=1e-5, rtol=1e-5
    )
    assert routed(x, task_ids="t1").shape == (10, 4)


def test_dense_and_masked_terms_materialise_per_task(tiny):
    """Baseline-style terms (dense, mask·scale·ref) on wrapped and unwrapped parameters."""
    model, base_sd, g, tmp = tiny
    ref = {"fc2.weight::ref": torch.randn(4, 16, generator=g), "offset::ref": torch.randn(4, generator=g)}
    tasks = {}
    for j in range(3):
        tasks[f"t{j}"] = {
            "fc2.weight::mask": (torch.rand(4, 16, generator=g) > 0.5).float(),
            "fc2.weight::scale": torch.tensor(0.5 + j),
            "fc1.bias::dense": torch.randn(16, generator=g),
            "norm.weight::dense": 0.2 * torch.randn(16, generator=g),
            "offset::mask": (torch.rand(4, generator=g) > 0.3).float(),
            "offset::scale": torch.tensor(1.0 + j),
            **lowrank_terms(g, "fc1.weight", 16, 8, 2),
        }
    art = make_artifact(
        tmp / "a", base_sd, {}, {**ref, "norm.bias::dense": 0.1 * torch.randn(16, generator=g)}, tasks
    )
    routed = RoutedModel(copy.deepcopy(model), art, adapter=Adapter(), cache_tasks=1)
    assert set(routed.swapped) == {"offset"} and isinstance(routed.routed["norm"], RoutedLayerNorm)
    x = torch.randn(9, 8, generator=g)
    ids = torch.tensor([2, 0, 1, 1, 2, 0, 0, 2, 1])
    expect = per_example_reference(model, art, base_sd, x, ids)
    torch.testing.assert_close(routed(x, task_ids=ids), expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(routed(x, task_ids=ids), expect, atol=1e-5, rtol=1e-5)  # with a warm cache


def test_router_and_bad_inputs(tiny):
    model, base_sd, g, tmp = tiny
    tasks = {"a": lowrank_terms(g, "fc1.weight", 16, 8, 1), "b": lowrank_terms(g, "fc1.weight", 16, 8, 1)}
    art = make_artifact(tmp / "a", base_sd, {}, {}, tasks)
    router = OracleRouter(art.tasks)
    assert router({"task_id": ["b", "a"]}).tolist() == [1, 0]
    with pytest.raises(DidiError, match="unknown task 'c'"):
        router({"task_id": ["c"]})
    with pytest.raises(DidiError, match="task id 5 is outside"):
        router({"task_id": torch.tensor([0, 5])})
    with pytest.raises(DidiError, match="no 'task_id' field"):
        router({"x": 1})
    routed = RoutedModel(copy.deepcopy(model), art, adapter=Adapter(), router=router)
    with pytest.raises(DidiError, match="task id 2 is outside"):
        routed(torch.randn(2, 8), task_ids=torch.tensor([0, 2]))
    with pytest.raises(DidiError, match="unknown task"):
        routed(torch.randn(2, 8), task_ids="zzz")

    class Other(nn.Module):  # a different backbone: no fc1
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 16)

    with pytest.raises(DidiError, match="tensor 'fc1.weight' has no module 'fc1'.*do not match"):
        RoutedModel(Other(), art, adapter=Adapter())

    class Wide(TinyNet):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(9, 16)

    with pytest.raises(
        DidiError, match=r"'fc1.weight' has shape \[16, 8\] in the artifact, the model has \[16, 9\]"
    ):
        RoutedModel(Wide(), art, adapter=Adapter())
    from didi.backbones.hf_encoder import HFEncoderAdapter

    with pytest.raises(DidiError, match="made with adapter 'state_dict', not 'hf_encoder'"):
        RoutedModel(copy.deepcopy(model), art, adapter=HFEncoderAdapter())


def test_group_terms_shared_by_task_subsets(tiny):
    """FlexMerge-style groups: terms stored once and added to their member tasks (lora ranks concatenate)."""
    model, base_sd, g, tmp = tiny
    tasks = {f"t{j}": lowrank_terms(g, "fc1.weight", 16, 8, 1) for j in range(3)}
    groups = {
        "g01": (
            ["t0", "t1"],
            {
                **lowrank_terms(g, "fc1.weight", 16, 8, 2),
                "norm.bias::dense": 0.3 * torch.randn(16, generator=g),
            },
        ),
        "g2": (["t2"], lowrank_terms(g, "fc2.weight", 4, 16, 1)),
    }
    art = make_artifact(tmp / "a", base_sd, {}, {}, tasks, groups=groups)
    routed = RoutedModel(copy.deepcopy(model), art, adapter=Adapter())
    x = torch.randn(8, 8, generator=g)
    ids = torch.tensor([0, 1, 2, 2, 1, 0, 2, 1])
    torch.testing.assert_close(
        routed(x, task_ids=ids), per_example_reference(model, art, base_sd, x, ids), atol=1e-5, rtol=1e-5
    )


class AttnNet(nn.Module):
    """nn.MultiheadAttention (self or cross) between two Linears; forwards every mask option of the module."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.pre = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)

    def forward(self, x, memory=None, **kw):
        h = self.pre(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
            memory = None if memory is None else memory.transpose(0, 1)
        kv = h if memory is None else memory
        o, w = self.attn(h, kv, kv, **kw)
        o = o if self.batch_first else o.transpose(0, 1)
        return o if w is None else (o, w)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_is_routed_not_swapped(tmp_path, batch_first):
    """open_clip's attention: experts on the packed in-projection (weight and bias) and on out_proj, mixed
    batch in one pass, equal to nn.MultiheadAttention run with each example's materialised weights — with
    boolean/float/padding/causal masks, attention weights, and cross-attention."""
    from didi.routing import RoutedMultiheadAttention

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    model = AttnNet(batch_first).eval()
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tasks = {
        f"t{j}": {
            **lowrank_terms(g, "attn.in_proj_weight", 24, 8, 2),
            "attn.in_proj_bias::dense": 0.3 * torch.randn(24, generator=g),
            **lowrank_terms(g, "attn.out_proj.weight", 8, 8, 1),
        }
        for j in range(3)
    }
    tasks["t2"] = lowrank_terms(g, "attn.out_proj.weight", 8, 8, 2)  # a task with out_proj terms only
    shared = lowrank_terms(g, "attn.in_proj_weight", 24, 8, 1)
    art = make_artifact(tmp_path / "a", base_sd, {}, shared, tasks)
    routed = RoutedModel(copy.deepcopy(model), art, adapter=Adapter())
    assert not routed.swapped and isinstance(routed.routed["attn"], RoutedMultiheadAttention)
    assert isinstance(routed.routed["attn.out_proj"], RoutedLinear)
    x = torch.randn(6, 5, 8, generator=g)
    mem = torch.randn(6, 3, 8, generator=g)
    ids = torch.tensor([2, 0, 1, 1, 0, 2])
    pad = torch.zeros(6, 5, dtype=torch.bool)
    pad[1, 3:] = pad[4, 4] = True
    cases = [
        dict(need_weights=False),
        dict(need_weights=True, average_attn_weights=False),
        dict(attn_mask=torch.ones(5, 5, dtype=torch.bool).triu(1), need_weights=False),
        dict(attn_mask=0.5 * torch.randn(5, 5, generator=g), key_padding_mask=pad),
        dict(attn_mask=0.5 * torch.randn(12, 5, 5, generator=g), need_weights=False),
        dict(memory=mem, need_weights=True),
    ]
    for kw in cases:
        got = routed(x, task_ids=ids, **kw)
        outs = []
        for i in range(6):
            ref = copy.deepcopy(model)
            ref.load_state_dict(art.task_state_dict(art.tasks[int(ids[i])], base=base_sd))
            one = {
                k: (
                    v[i : i + 1]
                    if k in ("memory", "key_padding_mask")
                    else v[2 * i : 2 * i + 2]
                    if k == "attn_mask" and v.dim() == 3
                    else v
                )
                for k, v in kw.items()
            }
            outs.append(ref(x[i : i + 1], **one))
        expect = (
            (torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]))
            if isinstance(outs[0], tuple)
            else torch.cat(outs)
        )
        torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-4, msg=lambda m: f"{kw}: {m}")
        base_out = model(x, **kw)
        assert not torch.allclose(
            base_out[0] if isinstance(base_out, tuple) else base_out,
            got[0] if isinstance(got, tuple) else got,
            atol=1e-3,
        )
    # one-task batches take the materialised fast path and agree with the per-row path
    one = torch.ones(6, dtype=torch.long)
    fast = routed(x, task_ids=one, need_weights=False)
    routed.fast_path = False
    torch.testing.assert_close(routed(x, task_ids=one, need_weights=False), fast, atol=1e-5, rtol=1e-4)


def test_contiguous_and_interleaved_rows_agree(tiny):
    """Task-sorted batches take the in-place slice path, interleaved ones the index path: same outputs."""
    model, base_sd, g, tmp = tiny
    tasks = {
        f"t{j}": {**lowrank_terms(g, "fc1.weight", 16, 8, 2), **lowrank_terms(g, "fc2.weight", 4, 16, 1)}
        for j in range(3)
    }
    art = make_artifact(tmp / "a", base_sd, {}, {}, tasks)
    routed = RoutedModel(copy.deepcopy(model), art, adapter=Adapter())
    x = torch.randn(9, 8, generator=g)
    for ids in (torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2]), torch.tensor([2, 0, 1, 0, 2, 1, 0, 2, 2])):
        torch.testing.assert_close(
            routed(x, task_ids=ids), per_example_reference(model, art, base_sd, x, ids), atol=1e-5, rtol=1e-5
        )


def test_conv2d_kernel_experts(tmp_path):
    """A conv kernel decomposed as an (out, in·kh·kw) matrix (open_clip's patch embedding): the routed
    two-convolution expert equals the convolution with the materialised kernel, in a mixed batch."""
    from didi.routing import RoutedConv2d

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 2)).eval()
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tasks = {
        f"t{j}": {
            **lowrank_terms(g, "0.weight", 6, 27, 2),
            "0.bias::dense": torch.randn(6, generator=g),
            "2.weight::dense": 0.2 * torch.randn(4, 6, 2, 2, generator=g),
        }
        for j in range(3)
    }
    art = make_artifact(tmp_path / "a", base_sd, {}, lowrank_terms(g, "0.weight", 6, 27, 1), tasks)
    routed = RoutedModel(copy.deepcopy(model), art, adapter=Adapter())
    assert not routed.swapped and all(isinstance(m, RoutedConv2d) for m in routed.routed.values())
    x = torch.randn(5, 3, 9, 9, generator=g)
    ids = torch.tensor([1, 2, 0, 2, 1])
    torch.testing.assert_close(
        routed(x, task_ids=ids), per_example_reference(model, art, base_sd, x, ids), atol=1e-5, rtol=1e-4
    )


# ------------------------------------------------------------------------------ routed layers as modules
def _lowrank_routed(tiny):
    """TinyNet with low-rank experts on fc1 and fc2 and a dense bias expert on fc1 (nothing swapped)."""
    model, base_sd, g, tmp = tiny
    tasks = {
        f"t{j}": {
            **lowrank_terms(g, "fc1.weight", 16, 8, 2),
            **lowrank_terms(g, "fc2.weight", 4, 16, 1),
            "fc1.bias::dense": 0.3 * torch.randn(16, generator=g),
        }
        for j in range(3)
    }
    art = make_artifact(tmp / "a", base_sd, {}, lowrank_terms(g, "fc1.weight", 16, 8, 1), tasks)
    routed = RoutedModel(copy.deepcopy(model), art, adapter=Adapter())
    assert not routed.swapped
    return routed, art


def test_experts_are_buffers_in_state_dict_and_move_with_to(tiny):
    model, base_sd, g, _ = tiny
    routed, art = _lowrank_routed(tiny)
    sd = routed.state_dict()
    for j in range(3):
        assert {f"model.fc1.experts.{j}.{k}" for k in ("A", "B", "db")} <= set(sd)
        assert {f"model.fc2.experts.{j}.A", f"model.fc2.experts.{j}.B"} <= set(sd)
    torch.testing.assert_close(
        sd["model.fc1.experts.1.db"], load_artifact(art.path).task_terms("t1")["fc1.bias::dense"]
    )
    x = torch.randn(6, 8, generator=g)
    ids = torch.tensor([2, 0, 1, 1, 0, 2])
    want = per_example_reference(model, art, base_sd, x, ids)
    routed(x, task_ids=torch.ones(6, dtype=torch.long))  # a fast-path W_t materialised in fp32
    routed.to(torch.float64)
    assert all(b.dtype == torch.float64 for n, b in routed.named_buffers() if ".experts." in n)
    got = routed(x.double(), task_ids=ids)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want.double(), atol=1e-5, rtol=1e-5)
    one = routed(x.double(), task_ids=torch.ones(6, dtype=torch.long))  # W_t made again, in fp64
    torch.testing.assert_close(
        one, per_example_reference(model, art, base_sd, x, torch.ones(6)).double(), atol=1e-5, rtol=1e-5
    )
    # a fresh routed model loads the experts from a state dict (they are state, not construction side data)
    other = RoutedModel(copy.deepcopy(model), art, adapter=Adapter())
    with torch.no_grad():
        for n, b in other.named_buffers():
            if ".experts." in n:
                b.zero_()
    other.load_state_dict({k: v.float() for k, v in routed.state_dict().items()})
    torch.testing.assert_close(other(x, task_ids=ids), want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_experts_move_to_the_device(tiny):
    model, base_sd, g, _ = tiny
    routed, art = _lowrank_routed(tiny)
    x = torch.randn(6, 8, generator=g)
    ids = torch.tensor([2, 0, 1, 1, 0, 2])
    routed(x, task_ids=torch.zeros(6, dtype=torch.long))  # a CPU W_t that the move must not reuse
    routed.to("cuda")
    assert all(b.is_cuda for n, b in routed.named_buffers() if ".experts." in n)
    want = per_example_reference(model, art, base_sd, x, ids)
    torch.testing.assert_close(routed(x.cuda(), task_ids=ids).cpu(), want, atol=1e-5, rtol=1e-5)
    zero = torch.zeros(6, dtype=torch.long)
    torch.testing.assert_close(
        routed(x.cuda(), task_ids=zero).cpu(),
        per_example_reference(model, art, base_sd, x, zero),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("second", ["mixed", "one_task"])
def test_concurrent_forwards_in_two_threads_are_independent(tiny, second):
    """Two batches in flight at once (a barrier in fc1's forward hook holds each thread until the other has
    entered the model too): each gets its sequential result, since the routing is per call, not on modules."""
    import threading

    _, _, g, _ = tiny
    routed, _ = _lowrank_routed(tiny)
    xa, xb = torch.randn(7, 8, generator=g), torch.randn(5, 8, generator=g)
    ida = torch.tensor([0, 2, 1, 1, 0, 2, 0])
    idb = torch.tensor([1, 1, 0, 2, 2]) if second == "mixed" else torch.full((5,), 2)
    want = {"a": routed(xa, task_ids=ida), "b": routed(xb, task_ids=idb)}
    barrier = threading.Barrier(2, timeout=30)

    def hold(*_) -> None:  # returns None: the layer's output is kept
        barrier.wait()

    handle = routed.model.fc1.register_forward_hook(hold)
    got, errors = {}, []

    def run(key, x, ids):
        try:
            got[key] = routed(x, task_ids=ids)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [
        threading.Thread(target=run, args=("a", xa, ida)),
        threading.Thread(target=run, args=("b", xb, idb)),
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        handle.remove()
    assert not errors, errors
    torch.testing.assert_close(got["a"], want["a"], atol=0, rtol=0)
    torch.testing.assert_close(got["b"], want["b"], atol=0, rtol=0)


def test_swapped_parameters_serialise_concurrent_forwards(tiny):
    """A model with per-task swapped parameters (shared state) still gives each thread its own result."""
    import threading

    model, base_sd, g, tmp = tiny
    tasks = {
        f"t{j}": {
            "offset::dense": 0.3 * torch.randn(4, generator=g),
            **lowrank_terms(g, "fc1.weight", 16, 8, 1),
        }
        for j in range(3)
    }
    art = make_artifact(tmp / "a", base_sd, {}, {}, tasks)
    routed = RoutedModel(copy.deepcopy(model), art, adapter=Adapter())
    assert set(routed.swapped) == {"offset"}
    x = torch.randn(6, 8, generator=g)
    batches = [torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([2, 2, 1, 1, 0, 0]), torch.full((6,), 1)]
    want = [routed(x, task_ids=ids) for ids in batches]
    errors = []

    def run(k):
        try:
            for _ in range(10):
                torch.testing.assert_close(routed(x, task_ids=batches[k]), want[k], atol=0, rtol=0)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_routed_layer_outside_a_routed_forward_is_refused(tiny):
    routed, _ = _lowrank_routed(tiny)
    with pytest.raises(DidiError, match="called without routing"):
        routed.model.fc1(torch.randn(2, 8))


def test_a_second_wrapper_for_a_module_type_is_refused():
    from didi.routing import WRAPPERS, register_wrapper

    class Custom(nn.Module):
        pass

    def factory(module, parent, params):
        return None

    def another(module, parent, params):
        return None

    try:
        register_wrapper(Custom)(factory)
        register_wrapper(Custom)(factory)  # the same factory again (a module imported twice): fine
        with pytest.raises(DidiError, match=r"wrapper .*Custom' is registered twice .*factory and .*another"):
            register_wrapper(Custom)(another)
        assert WRAPPERS[Custom] is factory
        with pytest.raises(DidiError, match="registered twice"):
            register_wrapper(nn.Linear)(another)
    finally:
        WRAPPERS.unregister(Custom)
