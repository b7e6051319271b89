"""Evaluation of a trained model on data it may never have seen (launch/eval.py): loss, perplexity and bits per
byte of each source, on one process or on the parallel model over torchrun's ranks (FSDP2, TP, PP, CP).

A source is either a shard set (its validation split, or `folder:train`), read exactly as the training loop's
validation reads it, or raw text (.txt, .jsonl/.json, .parquet files or folders of them), read by the shard
builder's own reader (data_pipeline/sources.py) and tokenized as the builder does (BOS + ids + EOS per document),
then packed into windows of seq_len + 1 tokens at stride seq_len as a shard set's are: every token but the first
is predicted once. With format=chat (chat.py), records of conversations are packed whole into windows and only
their assistant turns are labels, each conversation scored as if alone (chat_data.py); a chat shard set is read as
the training loop's validation reads it, packed. Batches are global (`batch_size` rows); each data-parallel rank
evaluates its rows of every batch, and the sums (nats, labelled tokens, bytes) are added over the ranks, so any number
of ranks gives the same figures. Under torchrun the model is built and run as training builds and runs it
(load_parallel): FSDP over the data-parallel ranks, and tp, pp and cp as given, through the loop's step runner.
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch

from data_pipeline.encode_worker import flatten_documents
from data_pipeline.loader import validation_batches, windows_to_batch
from data_pipeline.packing import ChatShardSet, PackStats
from data_pipeline.progress import Meter
from data_pipeline.shardset import ShardSet
from data_pipeline.sources import HUB_PREFIX, load_documents, resolve_inputs
from model import ModelConfig
from model.loss import IGNORE_INDEX
from model.meta import MetaFolder, is_meta_folder

from ..config import BatchShape, ParallelSection
from .chat_data import chat_batches, pack_source
from ..interop.hf_import import init_from, read_hf_config
from ..interop.offline_checkpoint import checkpoint_model_config, find_checkpoint, is_hf_folder
from ..loop.data import check_markers
from ..loop.step import StepRunner, build_runner, labelled_tokens, loss_sum
from ..loop.validation import bits_per_byte, label_bytes, perplexity
from ..parallel.distributed import Dist, all_reduce_sum
from ..parallel.tensor_parallel import check_tp_layout
from ..state.checkpoint_io import is_complete, read_train_state

log = logging.getLogger("train")
SPLITS = ("train", "val")  # `folder:split` picks a shard set's split; a bare folder means its val split
DOCS_PER_READ = 64  # documents read (and tokenized) at a time: memory stays at one batch plus these
PIECE_CHARS = 1 << 20  # a longer document is tokenized in pieces of about this many characters, cut after a newline
MAX_DEFAULT_SEQ_LEN = 2048  # seq_len of a checkpoint without a run's config.yaml: the model's, at most this


@dataclass
class Settings:
    seq_len: int
    batch_size: int  # rows per batch over all ranks (a run's micro_batch_size x its data-parallel ranks)
    max_batches: int | None = None  # None: every full batch of a shard set, all of a text source
    positions: bool = False  # batches carry per-document positions (the run's document_positions/masking)
    mask_boundary_loss: bool = False  # labels that are a BOS are ignored (the run's data.mask_boundary_loss)
    txt_mode: str = "file"  # a .txt file is one document (file), one per line, or one per paragraph
    text_field: str = "text"  # the field of .jsonl/.parquet records that holds the text
    chat: bool = False  # format=chat: conversations, their assistant turns scored (the run's data.format)
    template: str = ""  # chat: the template file ("": the tokenizer's own)
    overlong: str = "drop"  # chat: a conversation longer than seq_len + 1 tokens is dropped or truncated


@dataclass
class Placement:
    """Where the model runs: its device, its autocast dtype (None: as stored), this rank's data-parallel coordinate
    (which rows of each batch it scores) and, under torchrun, the step runner and which of its figures count."""
    device: torch.device
    autocast: torch.dtype | None = None
    rank: int = 0  # data-parallel rank: the ranks of a TP or CP group and the stages of a pipeline read one batch
    world: int = 1  # data-parallel ranks
    runner: StepRunner | None = None  # under torchrun: how the parallel model runs (train/loop/step.py)
    processes: int = 1
    main: bool = True  # prints, shows progress and writes
    counts_loss: bool = True  # one TP rank of the ranks that hold the loss (under PP the last stage's)
    counts_tokens: bool = True  # of those, under CP, one rank of each group (every cp rank adds its part of the loss)
    tp: int = 1  # the layout's tensor- and pipeline-parallel degrees (how lm-eval's windows are scored)
    pp: int = 1

    @classmethod
    def of(cls, env: Dist, runner: StepRunner) -> "Placement":
        """A rank of torchrun's, counting as train/loop/validation.py counts (each figure once)."""
        counts_loss = runner.holds_loss and env.tp_rank == 0
        return cls(env.device, None, env.dp_rank, env.dp_size, runner, env.world_size, env.is_main, counts_loss,
                   counts_loss and env.cp_rank == 0, env.tp, env.pp)


@dataclass
class Row:
    """One source's sums over all ranks, and the figures they give."""
    source: str
    nats: float  # summed cross-entropy of the labelled tokens
    tokens: int  # labelled (predicted) tokens
    bytes: int  # UTF-8 bytes of the text those tokens stand for
    packed: PackStats | None = None  # chat: the conversations, their windows, and those too long

    @property
    def loss(self) -> float:
        return self.nats / max(self.tokens, 1)

    def as_dict(self) -> dict:
        packed = {} if self.packed is None else {k: getattr(self.packed, k) for k in
                                                 ("conversations", "dropped", "truncated", "windows")}
        return {"source": self.source, "tokens": self.tokens, "bytes": self.bytes, "loss": self.loss,
                "perplexity": perplexity(self.loss), "bits_per_byte": bits_per_byte(self.nats, self.bytes), **packed}


def run_config(path) -> dict:
    """The config.yaml of the run that a run dir or one of its checkpoints (<run>/checkpoints/step_*) belongs to,
    as a dict ({} for a folder of no run: an HF or Meta folder, a copied checkpoint)."""
    path = Path(path)
    for run_dir in (path, path.parent.parent):
        if (run_dir / "config.yaml").is_file():
            from omegaconf import OmegaConf

            return OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    return {}


def default_out(path) -> Path:
    """Where results go without out=: the run dir (next to its metrics.jsonl) for a run or one of its checkpoints,
    else the working directory (an export or a checkpoint folder holds only what it was written with)."""
    path = Path(path)
    run_dir = next((d for d in (path, path.parent.parent) if (d / "config.yaml").is_file()), None)
    writable = run_dir is not None and os.access(run_dir, os.W_OK)
    return (run_dir if writable else Path.cwd()) / "eval.json"


def source_model_config(path) -> ModelConfig:
    """The ModelConfig of a run dir, DCP checkpoint, HF or Meta folder, without reading any weight."""
    path = find_checkpoint(path)
    if is_meta_folder(path):
        return MetaFolder(path).cfg
    return read_hf_config(path) if is_hf_folder(path) else checkpoint_model_config(path)


def checkpoint_step(path) -> int | None:
    """The training step a checkpoint was saved at (None for an HF or Meta folder)."""
    path = find_checkpoint(path)
    return read_train_state(path).get("step") if is_complete(path) else None


def load_parallel(path, layout: ParallelSection, s: Settings, env: Dist, document_masking: bool) -> StepRunner:
    """The step runner of the model over all ranks, built as training builds it (train/loop/step.py build_runner):
    FSDP2 over the data-parallel ranks, layout's tp, pp and cp, bf16 compute on CUDA, fp32 on CPU; then each rank
    loads its part of the weights (a DCP checkpoint reshards to any layout). A batch is a pipeline's micro-batch:
    its steps are pp of them."""
    model_cfg = source_model_config(path)
    check_layout(model_cfg, layout, s, env.dp_size)
    shape = BatchShape(s.batch_size // env.dp_size, s.batch_size * layout.pp, s.seq_len)
    runner = build_runner(model_cfg, layout, shape, env, seed=0, document_masking=document_masking, evaluates=True)
    init_from(path, runner.model)
    runner.model.eval()
    return runner


def check_batch_size(s: Settings, dp_size: int) -> None:
    if s.batch_size < 1 or s.batch_size % dp_size:
        raise ValueError(f"batch_size={s.batch_size} must be a positive multiple of the {dp_size} data-parallel ranks "
                         f"(processes / (tp x pp x cp)): each evaluates batch_size / those ranks rows of every batch")


def check_layout(model_cfg: ModelConfig, layout: ParallelSection, s: Settings, dp_size: int) -> None:
    """What training checks of a layout at start-up, with eval's keys: one line each."""
    check_batch_size(s, dp_size)
    if s.seq_len % layout.tp:
        raise ValueError(f"seq_len={s.seq_len} must be divisible by tp={layout.tp} (sequence parallelism splits the "
                         f"positions evenly)")
    check_tp_layout(model_cfg, s.seq_len, layout.tp)
    chunks = 2 * layout.cp * layout.tp  # each cp rank holds 2 of 2 x cp chunks, which TP splits again
    if layout.cp > 1 and s.seq_len % chunks:
        raise ValueError(f"seq_len={s.seq_len} must be divisible by 2 x cp x tp = {chunks} under context parallelism")


def split_spec(spec: str) -> tuple[Path, str]:
    """(folder, split) of a shard-set source: `folder` (its val split) or `folder:train`."""
    folder, sep, split = spec.rpartition(":")
    return (Path(folder), split) if sep and split in SPLITS else (Path(spec), "val")


def is_shard_set(spec: str) -> bool:
    return (split_spec(spec)[0] / "manifest.json").is_file()


def check_sources(specs: list[str]) -> None:
    """Fail before anything is loaded on a source that is not there (FileNotFoundError naming it) or that no
    reader takes (ValueError); hub names (hf:...) are checked when read, offline ones refused there."""
    if not specs:
        raise ValueError("data=[] names no source; pass data=[<shard set, text/jsonl/parquet file or folder>, ...]")
    for spec in specs:
        if spec.startswith(HUB_PREFIX):
            from huggingface_hub import constants

            if constants.HF_HUB_OFFLINE:
                raise ValueError(f"{spec}: HF_HUB_OFFLINE is set, and hub data needs the network; download it and "
                                 f"pass local files")
        elif not is_shard_set(spec):
            resolve_inputs([spec])


def shard_batches(spec: str, tok, s: Settings, where: Placement):
    """(this rank's batches of a shard set's split, in order, exactly as the training loop's validation reads
    them (data_pipeline.loader.validation_batches), how many there are, and a chat set's packing stats); the split
    must hold one batch."""
    folder, split = split_spec(spec)
    shards = ShardSet.open(folder, split=split, expect_tokenizer_sha256=tok.sha256, verify=False)
    check_markers(tok, [shards])
    if isinstance(shards, ChatShardSet) and not s.chat:
        raise ValueError(f"{folder} holds conversations (built with format=chat); pass format=chat")
    if s.chat and not isinstance(shards, ChatShardSet):
        raise ValueError(f"{folder} holds text, not conversations; format=chat reads .jsonl/.parquet records or a "
                         f"shard set built with format=chat (or leave format=chat out)")
    packing = shards.packing(s.seq_len, s.overlong) if s.chat else None
    n_windows = packing.n if packing else shards.n_windows(s.seq_len)
    n_batches = min(n_windows // s.batch_size, s.max_batches or float("inf"))
    return validation_batches(shards, s.seq_len, s.batch_size, where.rank, where.world, max_batches=s.max_batches,
                              return_positions=s.positions, mask_boundary_loss=s.mask_boundary_loss,
                              overlong=s.overlong), n_batches, packing and packing.stats


def document_tokens(docs, tok):
    """Token arrays of the documents in order, BOS + ids + EOS for each that is not blank, as the shard builder
    writes them (data_pipeline/encode_worker.py); a document over PIECE_CHARS comes a piece at a time."""
    for rows in docs.iter(batch_size=DOCS_PER_READ):
        short = []
        for text in rows["text"]:
            if not text.strip():
                continue
            if len(text) <= PIECE_CHARS:
                short.append(text)
                continue
            if short:
                yield flatten_documents(tok.encode_batch(short), np.int64, tok.bos_id, tok.eos_id)
                short = []
            yield from long_document(text, tok)
        if short:
            yield flatten_documents(tok.encode_batch(short), np.int64, tok.bos_id, tok.eos_id)


def long_document(text: str, tok):
    """A long document's tokens, its text encoded in pieces cut after a newline (where there is one): its ids
    are never all held at once. Only a token that would span a cut differs from encoding the whole."""
    yield np.array([tok.bos_id], dtype=np.int64)
    start = 0
    while start < len(text):
        end = len(text)
        if end - start > PIECE_CHARS:
            end = text.rfind("\n", start, start + PIECE_CHARS) + 1 or start + PIECE_CHARS
        yield np.array(tok.encode(text[start:end]), dtype=np.int64)
        start = end
    yield np.array([tok.eos_id], dtype=np.int64)


def windows(chunks, seq_len: int):
    """Windows of seq_len + 1 tokens at stride seq_len over a stream of token arrays, then the shorter rest (at
    least 2 tokens): every token but the first is a label exactly once."""
    buf = np.empty(0, dtype=np.int64)
    for chunk in chunks:
        buf = np.concatenate([buf, chunk])
        while len(buf) >= seq_len + 1:
            yield buf[: seq_len + 1]
            buf = buf[seq_len:]
    if len(buf) >= 2:
        yield buf


def padded_batch(rows: list[np.ndarray], n_rows: int, seq_len: int, bos_id: int, s: Settings) -> dict:
    """n_rows rows of the windows `rows` (a last, short window padded on the right, missing rows all padding);
    padded positions are labelled IGNORE_INDEX (causal attention keeps them unseen by the real ones)."""
    tokens, lengths = np.zeros((n_rows, seq_len + 1), dtype=np.int64), np.zeros(n_rows, dtype=np.int64)
    for i, window in enumerate(rows):
        tokens[i, : len(window)], lengths[i] = window, len(window)
    batch = windows_to_batch(tokens, np.arange(n_rows), bos_id, s.positions, s.mask_boundary_loss)
    padding = np.arange(seq_len)[None, :] >= (lengths[:, None] - 1)
    batch["labels"][torch.from_numpy(padding)] = IGNORE_INDEX
    return batch


def text_batches(docs, tok, s: Settings, where: Placement):
    """This rank's rows of each global batch of a raw-text source's documents, streamed: read and tokenized a
    few at a time (every rank reads all of them, so the windows are the same on any number of ranks)."""
    per_rank, rows, done = s.batch_size // where.world, [], 0
    mine = slice(where.rank * per_rank, (where.rank + 1) * per_rank)
    for window in windows(document_tokens(docs, tok), s.seq_len):
        rows.append(window)
        if len(rows) == s.batch_size:
            yield padded_batch(rows[mine], per_rank, s.seq_len, tok.bos_id, s)
            rows, done = [], done + 1
            if s.max_batches is not None and done >= s.max_batches:
                return
    if rows:  # the last, partial batch: every rank runs it (an FSDP forward needs all ranks), some on padding
        yield padded_batch(rows[mine], per_rank, s.seq_len, tok.bos_id, s)


class SourceProgress:
    """Tokens predicted of one source, in rank 0's bar or log lines (data_pipeline/progress.py). A shard set's
    total is known; a text source's is its UTF-8 bytes times the tokens per byte so far (at most `most`)."""

    def __init__(self, spec: str, where: Placement, most: int | None, text_bytes: int | None = None):
        self.most, self.text_bytes, self.world = most, text_bytes, where.world
        self.tokens = self.bytes = 0  # this rank's
        self.meter = Meter(f"evaluating {Path(spec).name or spec}", log, most if text_bytes is None else None,
                           "tokens", enabled=where.main)

    def add(self, tokens: int, n_bytes: int) -> None:
        """A batch done: this rank's labelled tokens and their bytes (the other ranks' are as many, near enough)."""
        self.tokens, self.bytes = self.tokens + tokens, self.bytes + n_bytes
        if self.text_bytes and self.bytes:
            estimate = round(self.text_bytes * self.tokens / self.bytes)
            self.meter.set_total(min(estimate, self.most) if self.most else estimate)
        self.meter.update(tokens * self.world)


def source_batches(spec: str, tok, s: Settings, where: Placement):
    """(this rank's batches of a source, its SourceProgress, a chat source's packing stats or None)."""
    if is_shard_set(spec):
        batches, n_batches, packed = shard_batches(spec, tok, s, where)
        return batches, SourceProgress(spec, where, n_batches * s.batch_size * s.seq_len), packed
    if s.chat:
        packing = pack_source(spec, tok, s.template, s.seq_len, s.overlong)
        n_batches = min(-(-packing.n // s.batch_size), s.max_batches or float("inf"))
        batches = chat_batches(packing, tok.bos_id, s.seq_len, s.batch_size, where.rank, where.world, s.max_batches)
        return batches, SourceProgress(spec, where, n_batches * s.batch_size * s.seq_len), packing.stats
    docs = load_documents([spec], text_field=s.text_field, txt_mode=s.txt_mode)
    text_bytes = int(pc.sum(pc.binary_length(docs.data.column("text"))).as_py() or 0)
    most = s.max_batches * s.batch_size * s.seq_len if s.max_batches else None
    return text_batches(docs, tok, s, where), SourceProgress(spec, where, most, text_bytes), None


def loss_sums(model, batches, where: Placement):
    """(batch, this rank's summed loss over it) of each batch: under torchrun as the step runner runs it (the
    pipeline joins micro-batches into its steps), else through the model."""
    if where.runner is not None:
        yield from where.runner.loss_sums(batches)
        return
    for batch in batches:
        positions = batch["position_ids"].to(where.device) if "position_ids" in batch else None
        yield batch, loss_sum(model, batch["input_ids"].to(where.device), batch["labels"].to(where.device),
                              positions, autocast=where.autocast)


@torch.no_grad()
def sum_batches(model, batches, where: Placement, byte_rule: tuple,
                progress: SourceProgress | None = None) -> tuple[float, int, int]:
    """(nats, labelled tokens, bytes) of the batches over all ranks, each counted once as train/loop/validation.py
    counts it. byte_rule: (Tokenizer.token_bytes()'s table, its dummy_prefix flag, the BOS id), for label_bytes."""
    total, count, n_bytes = torch.zeros((), device=where.device, dtype=torch.float64), 0, 0
    for batch, loss in loss_sums(model, batches, where):
        tokens, nbytes = labelled_tokens(batch), label_bytes(batch["input_ids"], batch["labels"], *byte_rule)
        if where.counts_loss:
            total += loss.double()
        if where.counts_tokens:
            count, n_bytes = count + tokens, n_bytes + nbytes
        if progress is not None:
            progress.add(tokens, nbytes)
    if where.processes == 1:
        return total.item(), count, n_bytes
    total, count, n_bytes = all_reduce_sum([total.item(), count, n_bytes], where.device)
    return total, int(count), int(n_bytes)


def evaluate(model, tok, specs: list[str], s: Settings, where: Placement) -> list[Row]:
    """One Row per source, in the order given (every rank must call it: the sums are all-reduced)."""
    check_batch_size(s, where.world)
    table, dummy_prefix = tok.token_bytes()
    model.eval()
    rows = []
    for spec in specs:
        batches, progress, packed = source_batches(spec, tok, s, where)
        if packed is not None and where.main:  # how many conversations, and how many were too long
            log.info(packed.describe(spec, s.seq_len, s.overlong))
        try:
            nats, tokens, n_bytes = sum_batches(model, batches, where, (table, dummy_prefix, tok.bos_id), progress)
        except BaseException:
            progress.meter.close(complete=False)
            raise
        progress.meter.close()
        if tokens == 0:
            raise ValueError(f"{spec}: no token to predict (blank documents only?); check the text and txt_mode")
        rows.append(Row(spec, nats, tokens, n_bytes, packed))
    return rows


def format_table(rows: list[Row]) -> str:
    """The rows as an aligned text table: source, tokens, loss (nats/token), perplexity, bits per byte."""
    width = max([len("source")] + [len(r.source) for r in rows])
    lines = [f"{'source':<{width}}  {'tokens':>12}  {'loss':>8}  {'perplexity':>11}  {'bits/byte':>9}"]
    for r in rows:
        d = r.as_dict()
        lines.append(f"{r.source:<{width}}  {r.tokens:>12,}  {d['loss']:>8.4f}  {d['perplexity']:>11.2f}  "
                     f"{d['bits_per_byte']:>9.4f}")
    for r in rows:
        if r.packed is not None and r.packed.dropped + r.packed.truncated:
            over = r.packed.dropped + r.packed.truncated
            lines.append(f"{r.source}: {over:,} of {r.packed.conversations:,} conversations longer than seq_len + 1 "
                         f"were {'dropped' if r.packed.dropped else 'truncated'} (overlong=drop|truncate decides)")
    return "\n".join(lines)


def check_seq_len(seq_len: int, model_cfg: ModelConfig) -> None:
    if not 1 <= seq_len <= model_cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} must be in [1, the model's max_seq_len={model_cfg.max_seq_len}]")


def default_seq_len(run: dict, model_cfg: ModelConfig) -> int:
    """The run's data.seq_len, else the model's max_seq_len capped at MAX_DEFAULT_SEQ_LEN."""
    return int(run.get("data", {}).get("seq_len") or min(model_cfg.max_seq_len, MAX_DEFAULT_SEQ_LEN))


def json_record(path, rows: list[Row], s: Settings, processes: int) -> dict:
    return {"checkpoint": str(find_checkpoint(path).resolve()), "step": checkpoint_step(path), "seq_len": s.seq_len,
            "batch_size": s.batch_size, "max_batches": s.max_batches, "processes": processes,
            "rows": [r.as_dict() for r in rows]}
