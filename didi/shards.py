"""The decomposition as a Lightning fit sharded across the run's processes (issue 11).

Under any launcher didi supports (the Trainer's `ddp` / `ddp_spawn`, torchrun, `fabric run`) every process
decomposes its own share of the zoo's tensors, balanced by estimated flops (`assign_shares`: deterministic,
so no process has to be told its share), into one temporary directory that rank 0 names; a row-streamed
matrix (Llama's embedding) is shared out by module, so that its range finders do not all land on one
process (`work_units`). After a barrier rank 0 checks it sees every process's files, joins the streamed
matrices' parts, assembles the index in plan order and renames the store into place. The store is the same
bytes whatever the number of processes. Each process says its share on stderr and the store's `shares.json`
records them (tensors, the modules of split streamed matrices, estimated flops, seconds).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from didi.artifact import temp_sibling
from didi.backbones.base import Zoo
from didi.decompose import (
    DecomposeConfig,
    FactorStore,
    ShareWriter,
    _fingerprint,
    assemble,
    assign_shares,
    cached_store,
    decompose,
    install,
    make_layout,
    share_of,
    store_root,
    unbudgeted,
    work_units,
)
from didi.errors import DidiError
from didi.progress import StageProgressBar
from didi.trainer import Trainers


def factor_store(
    zoo: Zoo, cfg: DecomposeConfig, trainers: Trainers | None, progress: bool = True
) -> FactorStore:
    """The factor store of `zoo`: cached, or computed by a sharded fit over the run's processes (`trainers`;
    None: in this process alone, `decompose`)."""
    cfg = unbudgeted(cfg)
    store = cached_store(zoo, cfg)
    if store is not None:
        return store
    if trainers is None:
        return decompose(zoo, cfg, progress)
    root = store_root(zoo, cfg)
    units = [1] * len(zoo.plan)  # replaced by this process's share when the fit knows its rank
    bar = StageProgressBar("decompose", "tensors", batch_units=units) if progress else None
    tmp = temp_sibling(root)
    module = DecomposeShards(zoo, cfg, str(tmp))
    trainer = trainers.fit("decompose", max_epochs=1, progress=bar)
    try:
        trainer.fit(module)
    except BaseException:  # rank 0's directory (this process's name for it, also under ddp_spawn)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    store = cached_store(zoo, cfg)
    if store is None:  # the fit ended without a store (a process failed and its error was shown)
        raise DidiError(f"{root}: the sharded decomposition did not produce a factor store")
    return store


class _Steps(IterableDataset):
    """This process's whole share as one step: Lightning syncs the processes at every step (its SIGTERM
    broadcast), so one tensor per step would make every rank wait for the slowest at each tensor."""

    def __init__(self) -> None:
        self.share: list[int] = []

    def __len__(self) -> int:
        return 1

    def __iter__(self):
        yield list(self.share)


class DecomposeShards(L.LightningModule):
    """One fit epoch: each step decomposes one tensor of this process's share (`ShareWriter`); the epoch's
    end writes the share's record, and rank 0 assembles the store once every process has written its own."""

    def __init__(self, zoo: Zoo, cfg: DecomposeConfig, tmp_hint: str) -> None:
        super().__init__()
        self.zoo, self.cfg, self.tmp_hint = zoo, cfg, tmp_hint
        self.steps = _Steps()
        self.automatic_optimization = False
        self._ddp_anchor = nn.Parameter(torch.zeros(()))  # DDP refuses a module without parameters
        self.writer: ShareWriter | None = None
        self.tmp: Path | None = None

    def setup(self, stage: str) -> None:
        strategy, world, rank = self.trainer.strategy, self.trainer.world_size, self.trainer.global_rank
        mine = _fingerprint(self.zoo, self.cfg)
        if world > 1:  # every process must decompose the same zoo with the same settings
            prints = [None] * world
            torch.distributed.all_gather_object(prints, mine)
            odd = [r for r, f in enumerate(prints) if f != prints[0]]
            if odd:
                raise DidiError(
                    f"decompose: rank {odd[0]} opened another zoo or other settings than rank 0 (fingerprint "
                    f"{prints[odd[0]]} vs {prints[0]}); start every process with the same command and files"
                )
        self.tmp = Path(strategy.broadcast(self.tmp_hint, src=0))
        if rank == 0:
            make_layout(self.tmp)
        strategy.barrier("decompose-layout")
        if not (self.tmp / "matrices").is_dir():
            raise DidiError(
                f"{self.tmp}: rank {rank} does not see the directory rank 0 made; decompose.cache_dir "
                f"must be on a file system every rank (every node) sees"
            )
        units, costs = work_units(self.zoo, self.cfg, world)
        picked = assign_shares(costs, world)[rank]
        share = share_of(units, picked)
        self.steps.share = share
        total = sum(costs) or 1.0
        whole = [p for p, mods in share if mods is None]
        mats = sum(1 for p in whole if self.zoo.plan[p].matrix_shape is not None)
        flops = sum(costs[u] for u in picked)
        if world > 1:
            split = "".join(
                f", modules {list(mods)} of {self.zoo.plan[p].name}" for p, mods in share if mods is not None
            )
            print(
                f"decompose: rank {rank}/{world} takes {len(whole)} tensors ({mats} matrices){split}, "
                f"{flops:.3g} estimated flops ({100 * flops / total:.1f} % of the work)",
                file=sys.stderr,
                flush=True,
            )
        self.bar = None
        for cb in self.trainer.callbacks:
            if isinstance(cb, StageProgressBar) and cb.stage == "decompose":
                cb.batch_units, self.bar = [len(share)], cb  # counted per item by `advance`
        # one device per rank: a GPU run decomposes on this rank's own GPU (`auto` would be cuda:0 for all)
        device = self.cfg.torch_device()
        if self.cfg.device == "auto" and self.trainer.strategy.root_device.type == "cuda":
            device = self.trainer.strategy.root_device
        self.writer = ShareWriter(self.zoo, self.cfg, self.tmp, device=device, share=[p for p, _ in share])

    def training_step(self, batch: list[tuple], batch_idx: int) -> None:
        for pos, modules in batch:
            self.writer.add(int(pos), None if modules is None else tuple(int(i) for i in modules))
            if self.bar is not None:
                self.bar.advance()

    def on_train_epoch_end(self) -> None:
        strategy, world, rank = self.trainer.strategy, self.trainer.world_size, self.trainer.global_rank
        record = self.writer.finish(rank)
        (self.tmp / f"share-{rank}.json").write_text(json.dumps(record))
        strategy.barrier("decompose-shares")
        error = None
        if rank == 0:
            try:
                records = []
                for r in range(world):
                    f = self.tmp / f"share-{r}.json"
                    if not f.is_file():
                        raise DidiError(
                            f"{self.tmp}: rank {r}'s share record is not visible to rank 0; "
                            f"decompose.cache_dir must be on a file system every rank (every node) sees"
                        )
                    records.append(json.loads(f.read_text()))
                for r in range(world):
                    (self.tmp / f"share-{r}.json").unlink()
                assemble(self.tmp, self.zoo, self.cfg, records)
                install(self.tmp, store_root(self.zoo, self.cfg))
            except Exception as e:  # every process raises it, none waits at a barrier for ever
                shutil.rmtree(self.tmp, ignore_errors=True)
                error = str(e) if isinstance(e, DidiError) else f"{type(e).__name__}: {e}"
        error = strategy.broadcast(error, src=0)
        if error:
            raise DidiError(error)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.steps, batch_size=None, num_workers=0)

    def configure_optimizers(self):
        return None
