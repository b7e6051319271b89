"""Process group and device mesh from torchrun's environment: NCCL on CUDA, gloo on CPU."""

import datetime
import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

# A collective lost a peer during training (its process died, or its node went away): this rank is fine
# and the job may be worth another attempt from the last checkpoint (launch/slurm/pretrain.sbatch
# requeues it, a bounded number of times).
EXIT_PEER_LOST = 76


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    # dims ("pp", "dp_replicate", "dp_shard", "cp", "tp"), without pp, dp_replicate, cp and tp where 1; with cp, FSDP
    # shards over dp_shard x cp flattened ("dp_shard_cp"): the cp ranks of a sequence hold one model, as torchtitan
    mesh: DeviceMesh
    dp_shard_cp: DeviceMesh | None = None  # dp_shard x cp flattened (cp > 1), kept: torch deprecates re-slicing it

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
    def cp(self) -> int:
        return self._size("cp")

    @property
    def cp_mesh(self) -> DeviceMesh | None:
        return self.mesh["cp"] if self.cp > 1 else None

    @property
    def dp_mesh(self) -> DeviceMesh:
        """The data-parallel dims FSDP shards (and, with dp_replicate, replicates) over; the cp ranks too."""
        if self._size("dp_replicate") > 1:
            return self.mesh["dp_replicate", "dp_shard_cp" if self.cp > 1 else "dp_shard"]
        return self.dp_shard_cp if self.cp > 1 else self.mesh["dp_shard"]

    @property
    def fsdp_size(self) -> int:
        """Ranks that hold one model between them (FSDP's mesh): data-parallel ranks x cp."""
        return self.dp_size * self.cp

    @property
    def pp(self) -> int:
        return self._size("pp")

    @property
    def pp_mesh(self) -> DeviceMesh | None:
        return self.mesh["pp"] if self.pp > 1 else None

    @property
    def dp_size(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel coordinate: the ranks of one TP group, of one CP group, and the stages of one
        pipeline read the same batch."""
        return (self.rank // (self.tp * self.cp)) % self.dp_size  # tp innermost, then cp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def cp_rank(self) -> int:
        return (self.rank // self.tp) % self.cp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.world_size // self.pp)  # pp outermost: a stage is a block of ranks


def layout(env: Dist) -> str:
    """The mesh in words, e.g. "dp_replicate 2 x dp_shard 4 x tp 8"."""
    return " x ".join(f"{name} {env.mesh[name].size()}" for name in env.mesh.mesh_dim_names)


def init_distributed(dp_replicate: int = 1, timeout_s: int = 600, tp: int = 1, pp: int = 1, cp: int = 1) -> Dist:
    """Join (or, run without torchrun, create) the process group and build the device mesh (dp_replicate,
    tp and pp are checked at start-up by ParallelSection.check). tp is the innermost dim, so a TP group is
    tp consecutive ranks: the GPUs of one node, where its per-block collectives run over NVLink. pp is the
    outermost: a pipeline's stages talk point to point, once per micro-batch, so they may sit on other nodes. cp
    sits inside the data-parallel dims, next to tp: its K/V all-gathers run every block, best within a node."""
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

    _hosts[:] = gather_hosts()
    dims = {"pp": pp, "dp_replicate": dp_replicate, "dp_shard": world // (pp * dp_replicate * cp * tp), "cp": cp,
            "tp": tp}
    dims = {name: size for name, size in dims.items() if size > 1 or name == "dp_shard"}
    mesh = init_device_mesh(device.type, tuple(dims.values()), mesh_dim_names=tuple(dims))
    flat = mesh["dp_shard", "cp"]._flatten("dp_shard_cp") if cp > 1 else None  # FSDP's mesh (torchtitan's name)
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=device, mesh=mesh, dp_shard_cp=flat)


_peer_lost = False  # a collective failed for want of a peer: teardown must not wait on the same peer again
_hosts: list[tuple[str, list[str]]] = []  # per rank: (host name, its addresses), to name a lost peer


def gather_hosts() -> list[tuple[str, list[str]]]:
    """Every rank's host name and the addresses it resolves to (what gloo binds to by default)."""
    name = socket.gethostname()
    try:
        addresses = sorted(set(socket.gethostbyname_ex(name)[2]))
    except OSError:
        addresses = []
    hosts = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, (name, addresses))
    return hosts


# How a collective fails when a peer's process is gone (killed, crashed, its node lost): gloo's socket
# errors (third_party/gloo/gloo/transport/tcp/pair.cc: "Read error [10.0.0.2]:41234: Connection reset by
# peer", "Connection closed by peer", a write's "Broken pipe") and NCCL's ncclRemoteError (torch's NCCLUtils:
# "remote process exited or there was a network error"). Lower case: the text is compared lowered.
PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "remote process exited",
             "ncclremoteerror")


class PeerLost(ConnectionError):
    """A collective failed because another rank's process is gone (one line, no traceback)."""
    exit_status = 1  # EXIT_PEER_LOST once training has started (see collective_failure)


class CollectiveTimeout(TimeoutError):
    """A collective gave up waiting for a peer (one line, no traceback)."""
    exit_status = 1


def lost_peer(error_text: str, rank: int) -> str:
    """Who was lost, from the peer address in gloo's error: "rank 3 on node2 (10.77.0.12)"; else "a peer"."""
    found = re.search(r"\[([0-9a-fA-F.:]+)\]:\d+", error_text)
    if not found:
        return "a peer"
    address = found.group(1)
    ranks = [r for r, (_, addresses) in enumerate(_hosts) if address in addresses and r != rank]
    if not ranks:
        return f"the peer at {address}"
    who = f"rank {ranks[0]}" if len(ranks) == 1 else f"one of ranks {', '.join(map(str, ranks))}"
    return f"{who} on {_hosts[ranks[0]][0]} ({address})"


def collective_failure(e: BaseException, where: str, rank: int, timeout_s: int) -> OSError | None:
    """The one-line error to raise instead of `e` when `e` is a collective that lost a peer or gave up
    waiting for one, else None. In training (not during start-up, where one rank's bad input makes its
    peers lose it) its exit_status is EXIT_PEER_LOST: worth another attempt from the last checkpoint."""
    global _peer_lost
    if not isinstance(e, RuntimeError):
        return None
    text = str(e).lower()
    gone = next((s for s in PEER_GONE if s in text), None)
    if gone:  # first: NCCL's remote error names its timeout setting too ("Timeout=600000")
        said = str(e)[text.index(gone):][:len(gone)]
        error = PeerLost(f"rank {rank} lost {lost_peer(str(e), rank)} {where} (its process died or its node went "
                         f"away; see its log): {said}")
    elif "timed out" in text or "timeout" in text:
        error = CollectiveTimeout(f"collective timed out {where} on rank {rank} after {timeout_s} s: another rank "
                                  f"stopped answering (hung, stopped or dead; see its log); collective_timeout_s "
                                  f"sets the wait")
    else:
        return None
    _peer_lost = True
    if where.startswith("at step"):
        error.exit_status = EXIT_PEER_LOST
    return error


class PeerFailedAtStart(OSError):
    """Another rank could not start (bad input on its node): this one stops too, naming it."""


def on_every_rank(start, what: str):
    """start() on every rank, then a check that it worked on all: where it raised (bad input: OSError or
    ValueError) on any rank, every rank fails, that one with its own error and the others naming its rank
    and host, so no rank goes on to wait for it. Also a barrier."""
    error = result = None
    try:
        result = start()
    except (OSError, ValueError) as e:
        error = e
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, None if error is None else str(error))
    if error is not None:
        raise error
    failed = next(((rank, problem) for rank, problem in enumerate(problems) if problem), None)
    if failed:
        rank, problem = failed
        raise PeerFailedAtStart(f"rank {rank} on {_hosts[rank][0]} could not {what}: {problem}")
    return result


def destroy_distributed(every_rank_here: bool = True) -> None:
    """every_rank_here: all ranks end here together (a finished or stopped run), not after an error, which one
    rank may meet alone while the others wait for it in a step's collective."""
    if dist.is_initialized():
        # A barrier first: gloo's rank 0 can abort at exit when peers are still tearing down. Not when this
        # rank fails alone: it would wait in it for the others (collective_timeout_s), which wait for it
        # in their step; exiting now closes its connections, and they fail at once naming it.
        if every_rank_here and not _peer_lost:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over all ranks (one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole on every rank of its mesh; a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t
