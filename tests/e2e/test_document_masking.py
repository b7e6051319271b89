"""Document-masked attention (data.document_masking): a packed window never attends across documents.

In-process checks of the model against each document run alone, flex against the SDPA reference, one
mask per micro-batch, activation checkpointing and compile, the loader's boundary labels, the memory
count and the start-up errors; then one 2-rank run through the real entry point, resumed bit-exactly."""

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, ledger_by_rank, losses, pretrain, tiny_data, without_torchrun_summary
from torch.utils._python_dispatch import TorchDispatchMode

import model.attention
from data_pipeline.loader import ShardSet, TokenLoader
from data_pipeline.shard_format import HEADER_BYTES, file_sha256
from model import ModelConfig, build_model
from model.loss import IGNORE_INDEX
from train.config import DataSection
from train.loop.step import labelled_tokens
from train.parallel.parallelize import apply_activation_checkpointing
from train.planner.memory import document_mask_bytes, estimate_memory

CFG = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=64)
ROWS = [[5, 17, 10], [12, 3, 17]]  # document lengths of each packed row: uneven, T = 32


def packed_batch(seed: int = 0):
    """Token ids (2, 32), positions restarting at each document, and labels that stay inside a document
    (the last token of each has none), as the solo runs below label them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, CFG.vocab_size, (len(ROWS), sum(ROWS[0])), generator=g)
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in ROWS])
    labels = torch.roll(ids, -1, dims=1)
    labels[torch.roll(positions, -1, dims=1) == 0] = IGNORE_INDEX  # the next token starts another document
    return ids, positions, labels


def documents(row: int):
    """(start, end) of each document of a packed row."""
    ends = np.cumsum(ROWS[row])
    return list(zip(ends - ROWS[row], ends))


def grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_a_packed_window_equals_each_document_run_alone():
    """Logits and parameter gradients of two packed rows of three uneven documents equal those of each
    document run by itself (plain causal attention, positions from 0), in fp32 to 1e-5."""
    llama = build_model(CFG, seed=0, document_masking=True)
    ids, positions, labels = packed_batch()
    packed_logits = llama(ids, positions)
    llama(ids, positions, labels).backward()
    packed_grads = grads(llama)
    llama.zero_grad()
    llama.document_masking = False  # the same weights; alone, each document runs under the causal kernel
    for b in range(len(ROWS)):
        for start, end in documents(b):
            alone = ids[b:b + 1, start:end]
            torch.testing.assert_close(packed_logits[b:b + 1, start:end], llama(alone), rtol=0, atol=1e-5)
            llama(alone, labels=labels[b:b + 1, start:end]).backward()  # gradients add up over the documents
    for packed, alone in zip(packed_grads, grads(llama)):
        torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)


def test_the_first_token_of_every_document_sees_only_itself():
    """In the mask, a document's first row allows its own column only; in the model, its logits are those
    of that one token run alone, whatever precedes it."""
    ids, positions, _ = packed_batch()
    mask = model.attention.document_mask(positions, "sdpa", torch.float32)  # (B, 1, T, T)
    llama = build_model(CFG, seed=0, document_masking=True)
    with torch.no_grad():
        logits = llama(ids, positions)
        llama.document_masking = False
        for b in range(len(ROWS)):
            for start, _ in documents(b):
                assert torch.isfinite(mask[b, 0, start]).nonzero().flatten().tolist() == [start]
                torch.testing.assert_close(logits[b, start], llama(ids[b:b + 1, start:start + 1])[0, 0],
                                           rtol=0, atol=1e-5)


def test_flex_forward_on_cpu_equals_the_sdpa_reference():
    """The GPU path's kernel (flex_attention with a BlockMask), run forward on the CPU, gives the SDPA
    reference's logits on the same weights."""
    llama = build_model(CFG, seed=0, document_masking=True)
    ids, positions, _ = packed_batch()
    with torch.no_grad():
        reference = llama(ids, positions)
        llama.mask_kind = "flex"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flex_attention warns that eager mode is slow
            try:
                flex = llama(ids, positions)
            except (NotImplementedError, RuntimeError) as e:
                pytest.skip(f"flex_attention's forward does not run on this CPU torch {torch.__version__}: {e}")
    torch.testing.assert_close(flex, reference, rtol=0, atol=1e-5)


class SdpaCalls(TorchDispatchMode):
    """Records the attention kernels that run and whether each had a mask and is_causal."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "scaled_dot_product" in func.__name__ and "backward" not in func.__name__:
            named = {**{a.name: v for a, v in zip(func._schema.arguments, args)}, **kwargs}
            self.calls.append((named.get("attn_mask") is not None, named.get("is_causal", False)))
        return func(*args, **kwargs)


def test_one_mask_per_micro_batch_shared_by_every_layer(monkeypatch):
    """Counting the builder's calls over a forward and backward of 3 checkpointed layers (which recompute
    their forward): one; every block gets that same object. Without document_masking no mask is ever
    built and attention is the causal kernel, as before."""
    built = []
    real = model.attention.document_mask

    def counted(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(model.attention, "document_mask", counted)
    ids, positions, labels = packed_batch()
    masked = build_model(CFG, seed=0, document_masking=True)
    seen = []
    for block in masked.layers.values():
        block.register_forward_pre_hook(lambda _, args: seen.append(args[3]))
    apply_activation_checkpointing(masked, "full")
    masked(ids, positions, labels).backward()
    assert len(built) == 1
    assert len(seen) == 2 * CFG.n_layers  # each block's forward and its recompute in the backward
    assert all(mask is built[0] for mask in seen)

    plain = build_model(CFG, seed=0)
    with SdpaCalls() as sdpa:
        plain(ids, positions, labels)
    assert len(built) == 1  # not called again
    assert sdpa.calls == [(False, True)] * CFG.n_layers


def test_bf16_autocast_masks_in_the_compute_dtype():
    """Under bf16 autocast (one GPU trains so) the additive mask is bf16, as SDPA requires; the loss is finite."""
    masked = build_model(CFG, seed=0, document_masking=True)
    ids, positions, labels = packed_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = masked.tok_embeddings(ids).to(torch.bfloat16)
        assert masked.document_mask(positions, h).dtype == torch.bfloat16
        assert torch.isfinite(masked(ids, positions, labels))


def loss_and_grads(ac_mode: str, compile_blocks: bool = False):
    cfg = ModelConfig(**{**CFG.__dict__, "n_layers": 2})
    masked = build_model(cfg, seed=0, document_masking=True)
    apply_activation_checkpointing(masked, ac_mode, every=2)
    if compile_blocks:
        for block in masked.layers.values():
            block.compile()
    ids, positions, labels = packed_batch(seed=1)
    loss = masked(ids, positions, labels)
    loss.backward()
    return loss.detach(), grads(masked)


def test_checkpointing_modes_and_compile_give_the_same_loss_and_grads():
    """Every activation-checkpointing mode recomputes the masked forward exactly; compiled blocks take
    the mask as an input and agree to fp32 rounding."""
    reference = loss_and_grads("none")
    for mode in ("full", "every_k", "selective"):
        loss, g = loss_and_grads(mode)
        assert loss == reference[0], mode
        assert all(torch.equal(a, b) for a, b in zip(g, reference[1])), mode
    loss, g = loss_and_grads("none", compile_blocks=True)
    torch.testing.assert_close(loss, reference[0], rtol=0, atol=1e-5)
    for a, b in zip(g, reference[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_the_memory_planner_counts_the_one_mask():
    """What autograd keeps of (T, T) size over a masked forward of 3 layers is the one shared mask, and
    the planner counts exactly it (sdpa); the flex BlockMask's tensors are what it counts for flex."""
    T = 48  # no model dimension, so a kept tensor with two T's in its shape is a mask
    ids = torch.randint(3, CFG.vocab_size, (2, T))
    positions = torch.cat([torch.arange(20), torch.arange(28)]).repeat(2, 1)
    masked = build_model(CFG, seed=0, document_masking=True)
    kept = {}

    def pack(t):
        if list(t.shape).count(T) == 2:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        masked(ids, positions)
    assert list(kept.values()) == [document_mask_bytes(2, T, "sdpa", 4)]
    plan = estimate_memory(CFG, 2, T, 1, "none", 4, document_mask="sdpa")
    assert plan["document_mask"] == 2 * T * T * 4
    assert "document_mask" not in estimate_memory(CFG, 2, T, 1, "none", 4)
    block_mask = model.attention.document_mask(positions, "flex", torch.float32)
    tensors = [t for t in block_mask.as_tuple() if isinstance(t, torch.Tensor)]
    assert sum(t.nbytes for t in tensors) == document_mask_bytes(2, T, "flex")


# -- the data side and the real entry point --------------------------------------------------------

@pytest.fixture(scope="module")
def paragraphs(tmp_path_factory) -> list[str]:
    """Overrides naming the tiny tokenizer and a shard set of the same plays cut into paragraphs: many
    documents of uneven length per 64-token window (the plays whole would put a BOS in few windows)."""
    from data_pipeline.build import build_shards
    from data_pipeline.sample_corpus import sample_corpus_dir
    from data_pipeline.tokenizer import Tokenizer

    tokenizer = next(o for o in tiny_data(tmp_path_factory) if o.startswith("data.tokenizer="))
    out = tmp_path_factory.getbasetemp() / "document_masking" / "shards"
    files = [str(p) for p in sorted(sample_corpus_dir().glob("*.txt"))[:4]]
    build_shards(files, out, Tokenizer(tokenizer.split("=", 1)[1]), txt_mode="paragraph", val_fraction=0.25,
                 num_proc=1, progress=False)
    return ["data.demo=false", tokenizer, f"data.shards=[{out}]"]


def shard_dir(overrides: list[str]) -> Path:
    return Path(next(o for o in overrides if o.startswith("data.shards="))[len("data.shards=["):-1])


def test_boundary_labels_are_ignored_and_nothing_else_changes(paragraphs):
    """mask_boundary_loss turns exactly the labels that are a BOS into the ignore index: same samples,
    inputs and positions, and the labelled-token count drops by the number of boundaries."""
    shards = ShardSet.open(shard_dir(paragraphs))
    layout = dict(seq_len=64, global_batch_size=8, return_positions=True)
    plain = next(TokenLoader(shards, **layout))
    masked = next(TokenLoader(shards, **layout, mask_boundary_loss=True))
    for key in ("input_ids", "sample_index", "position_ids"):
        assert torch.equal(plain[key], masked[key])
    boundary = plain["labels"] == shards.bos_id
    assert boundary.sum() > 8  # several documents per window
    assert torch.equal(masked["labels"], plain["labels"].masked_fill(boundary, IGNORE_INDEX))
    assert labelled_tokens(masked) == labelled_tokens(plain) - int(boundary.sum())


def test_mask_boundary_loss_needs_document_masking():
    DataSection(document_masking=True, mask_boundary_loss=True).check()
    with pytest.raises(ValueError, match=r"^data.mask_boundary_loss=True needs data.document_masking=true"):
        DataSection(mask_boundary_loss=True).check()


def without_bos(source: Path, out: Path) -> Path:
    """A valid copy of a shard set whose documents carry no BOS (each BOS became an EOS; checksums and
    document counts rewritten), as shards written without document markers are."""
    shutil.copytree(source, out)
    manifest = json.loads((out / "manifest.json").read_text())
    bos, eos = manifest["tokenizer"]["bos_id"], manifest["tokenizer"]["eos_id"]
    for split in manifest["splits"].values():
        split["documents"] = 0
        for entry in split["shards"]:
            path = out / entry["file"]
            tokens = np.fromfile(path, dtype=manifest["dtype"], offset=HEADER_BYTES)
            tokens[tokens == bos] = eos
            with open(path, "r+b") as f:
                f.seek(HEADER_BYTES)
                f.write(tokens.tobytes())
            entry["sha256"] = file_sha256(path)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_shards_without_bos_markers_are_refused_at_start_up(paragraphs, tmp_path):
    """The loader refuses positions (and so the mask) over shards with no BOS markers; through the entry
    point that is one line naming the shard set and the keys, before any step."""
    bare = without_bos(shard_dir(paragraphs), tmp_path / "bare")
    with pytest.raises(ValueError, match="no BOS markers"):
        TokenLoader(ShardSet.open(bare), seq_len=64, global_batch_size=8, return_positions=True)
    overrides = [o for o in paragraphs if not o.startswith("data.shards=")] + [f"data.shards=[{bare}]"]
    proc = pretrain(1, tmp_path / "run", *TINY, *overrides, "data.document_masking=true", check=False)
    errors = [line for line in without_torchrun_summary(proc.stderr).splitlines() if line.startswith("error")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert "no BOS markers" in errors[0] and "data.document_masking=false" in errors[0]
    assert "Traceback" not in without_torchrun_summary(proc.stderr)


def test_two_rank_masked_training_resumes_bit_exact_on_the_loaders_samples(paragraphs, tmp_path):
    """2 ranks (FSDP, gloo), 2 accumulated micro-batches each, with data.document_masking and
    data.mask_boundary_loss on: the loss falls; a resume from the step-3 checkpoint repeats steps 4-6 bit
    for bit; and every rank consumed exactly the samples the loader alone gives it (masking changes
    attention, not data)."""
    run = tmp_path / "run"
    masking = ["data.document_masking=true", "data.mask_boundary_loss=true", "checkpoint.interval=3",
               "micro_batch_size=4"]
    pretrain(2, run, *TINY, *paragraphs, *masking)
    first = losses(run)
    assert sorted(first) == list(range(1, 7)) and first[6] < first[1]
    pretrain(2, run, *TINY, *paragraphs, *masking, "checkpoint.resume=3")
    again = losses(run)
    assert [again[s] for s in (4, 5, 6)] == [first[s] for s in (4, 5, 6)]

    shards = ShardSet.open(shard_dir(paragraphs))
    global_batch = 16  # conf/debug.yaml's
    for rank in range(2):
        loader = TokenLoader(shards, seq_len=64, global_batch_size=global_batch, dp_rank=rank, dp_size=2)
        expected = {step: next(loader)["sample_index"].tolist() for step in range(1, 7)}
        assert {step: files[f"rank{rank}.jsonl"] for step, files in ledger_by_rank(run).items()} == expected
