"""Process group and device mesh from torchrun's environment: NCCL on CUDA, gloo on CPU."""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh  # dims ("pp", "dp_replicate", "dp_shard", "tp"), without pp, dp_replicate and tp where 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _size(self, dim: str) -> int:
        return self.mesh[dim].size() if self.mesh is not None and dim in self.mesh.mesh_dim_names else 1

    @property
    def tp(self) -> int:
        return self._size("tp")

    @property
    def tp_mesh(self) -> DeviceMesh | None:
        return self.mesh["tp"] if self.tp > 1 else None

    @property
    def dp_mesh(self) -> DeviceMesh:
        """The data-parallel dims FSDP shards (and, with dp_replicate, replicates) over."""
        return self.mesh["dp_replicate", "dp_shard"] if self._size("dp_replicate") > 1 else self.mesh["dp_shard"]

    @property
    def pp(self) -> int:
        return self._size("pp")

    @property
    def pp_mesh(self) -> DeviceMesh | None:
        return self.mesh["pp"] if self.pp > 1 else None

    @property
    def dp_size(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel coordinate: the ranks of one TP group, and the stages of one pipeline,
        read the same batch."""
        return (self.rank // self.tp) % self.dp_size  # tp innermost: a TP group is tp consecutive ranks

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.world_size // self.pp)  # pp outermost: a stage is a block of ranks


def layout(env: Dist) -> str:
    """The mesh in words, e.g. "dp_replicate 2 x dp_shard 4 x tp 8"."""
    return " x ".join(f"{name} {env.mesh[name].size()}" for name in env.mesh.mesh_dim_names)


def init_distributed(dp_replicate: int = 1, timeout_s: int = 600, tp: int = 1, pp: int = 1) -> Dist:
    """Join (or, run without torchrun, create) the process group and build the device mesh (dp_replicate,
    tp and pp are checked at start-up by ParallelSection.check). tp is the innermost dim, so a TP group is
    tp consecutive ranks: the GPUs of one node, where its per-block collectives run over NVLink. pp is the
    outermost: a pipeline's stages talk point to point, once per micro-batch, so they may sit on other nodes."""
    # A plain `python launch/pretrain.py` is a world of one.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])

    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        # torchrun --max-restarts restarts the workers against the same store (same MASTER_PORT): keys
        # the dead attempt left there (gloo's peer addresses) could be read by the new one, which then
        # fails to connect. A prefix per attempt keeps them apart.
        restart, store = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), None
        if restart and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            store = dist.PrefixStore(f"restart{restart}/", dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout))
        dist.init_process_group(backend, timeout=timeout, device_id=device if backend == "nccl" else None, store=store,
                                rank=rank if store else -1, world_size=world if store else -1)

    dims = {"pp": pp, "dp_replicate": dp_replicate, "dp_shard": world // (pp * dp_replicate * tp), "tp": tp}
    dims = {name: size for name, size in dims.items() if size > 1 or name == "dp_shard"}
    mesh = init_device_mesh(device.type, tuple(dims.values()), mesh_dim_names=tuple(dims))
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=device, mesh=mesh)


_peer_lost = False  # a collective failed for want of a peer: teardown must not wait on the same peer again

# How a collective fails when a peer's process is gone (killed, crashed, its node lost): gloo's socket
# errors (third_party/gloo/gloo/transport/tcp/pair.cc: "Read error ...: Connection reset by peer",
# "Connection closed by peer", a write's "Broken pipe") and NCCL's ncclRemoteError (torch's NCCLUtils:
# "remote process exited or there was a network error"). Lower case: the text is compared lowered.
PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "remote process exited",
             "ncclremoteerror")


class PeerLost(ConnectionError):
    """A collective failed because another rank's process is gone (one line, no traceback)."""


def collective_failure(e: BaseException, where: str, rank: int, timeout_s: int) -> OSError | None:
    """The one-line error to raise instead of `e` when `e` is a collective that lost a peer or gave up
    waiting for one, else None."""
    global _peer_lost
    if not isinstance(e, RuntimeError):
        return None
    text = str(e).lower()
    gone = next((s for s in PEER_GONE if s in text), None)
    if gone:  # first: NCCL's remote error names its timeout setting too ("Timeout=600000")
        _peer_lost = True
        said = str(e)[text.index(gone):][:len(gone)]
        return PeerLost(f"rank {rank} lost its peer {where} (another rank died; see its log): {said}")
    if "timed out" in text or "timeout" in text:
        _peer_lost = True
        return TimeoutError(f"collective timed out {where} on rank {rank} after {timeout_s} s: another rank "
                            f"stopped answering (hung, stopped or dead; see its log); collective_timeout_s sets "
                            f"the wait")
    return None


def destroy_distributed() -> None:
    if dist.is_initialized():
        # A barrier first: gloo's rank 0 can abort at exit when peers are still tearing down.
        if not _peer_lost:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over all ranks (one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
