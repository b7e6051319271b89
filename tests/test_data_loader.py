"""Loader: exact epoch coverage across ranks, resume (also onto another dp_size), mixtures, positions, validation."""

import numpy as np
import pytest
import torch

from data_pipeline.loader import ShardSet, TokenLoader, validation_batches
from data_pipeline.shuffle import Permutation

SEQ_LEN = 64


@pytest.fixture(scope="module")
def train(shards):
    return ShardSet.open(shards, "train")


@pytest.fixture(scope="module")
def stream(train):
    """The whole train token stream, read independently of the loader's window logic."""
    out = np.empty(train.n_tokens, dtype=np.int64)
    train.read(0, out)
    return out


def run(loader, steps):
    """Concatenated sample indices and windows of `steps` batches."""
    batches = [next(loader) for _ in range(steps)]
    return (torch.cat([b["sample_index"] for b in batches]).numpy(),
            torch.cat([torch.cat([b["input_ids"], b["labels"][:, -1:]], 1) for b in batches]).numpy())


def stream_windows(stream: np.ndarray) -> np.ndarray:
    """All stride-SEQ_LEN windows of SEQ_LEN + 1 tokens, cut from the raw stream."""
    return np.lib.stride_tricks.sliding_window_view(stream, SEQ_LEN + 1)[::SEQ_LEN]


def window_ids(rows: np.ndarray, stream: np.ndarray) -> list[int]:
    """Which window of the stream each row is (asserting it is one)."""
    lookup = {w.tobytes(): i for i, w in enumerate(stream_windows(stream))}
    ids = [lookup.get(np.ascontiguousarray(r).tobytes()) for r in rows]
    assert None not in ids, "a row is not a window of the stream"
    return ids


@pytest.mark.parametrize("permutation_size", [1, 2, 7, 64, 1000, 4097])
def test_permutation_is_a_bijection(permutation_size):
    p = Permutation(permutation_size, "test", 3)
    image = p(np.arange(permutation_size))
    assert np.array_equal(np.sort(image), np.arange(permutation_size))
    if permutation_size >= 64:
        assert not np.array_equal(image, np.arange(permutation_size))  # actually shuffled
        assert not np.array_equal(image, Permutation(permutation_size, "test", 4)(np.arange(permutation_size)))


@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_every_window_once_per_epoch_across_ranks(train, stream, dp_size):
    n = train.n_windows(SEQ_LEN)
    batch = 6
    steps = n // batch
    seen_index, seen_rows = [], []
    for rank in range(dp_size):
        loader = TokenLoader(train, seq_len=SEQ_LEN, global_batch_size=batch, dp_rank=rank, dp_size=dp_size, seed=5)
        index, rows = run(loader, steps)
        assert np.all(index % batch // (batch // dp_size) == rank)  # rank r holds rows [r*B/W, (r+1)*B/W)
        seen_index.append(index)
        seen_rows.append(rows)
    index = np.concatenate(seen_index)
    assert np.array_equal(np.sort(index), np.arange(steps * batch))  # ranks disjoint, nothing skipped
    # what the ranks delivered are distinct windows of the raw stream: each window at most once this epoch
    delivered = window_ids(np.concatenate(seen_rows), stream)
    assert len(set(delivered)) == len(delivered) == steps * batch
    loader = TokenLoader(train, seq_len=SEQ_LEN, global_batch_size=batch, seed=5)
    _, _, windows = loader.locate(np.arange(n))
    assert np.array_equal(np.sort(windows), np.arange(n))  # the whole epoch is a permutation of the windows
    assert n - steps * batch < batch  # only the tail that cannot fill a batch was left for the next epoch


def test_rank_rows_are_slices_of_the_global_batch(train):
    full = TokenLoader(train, seq_len=SEQ_LEN, global_batch_size=6, seed=1)
    parts = [TokenLoader(train, seq_len=SEQ_LEN, global_batch_size=6, dp_rank=r, dp_size=3, seed=1) for r in range(3)]
    for _ in range(3):
        whole = next(full)
        assert torch.equal(torch.cat([next(p)["input_ids"] for p in parts]), whole["input_ids"])


def test_labels_are_inputs_shifted_by_one(train, stream):
    b = next(TokenLoader(train, seq_len=SEQ_LEN, global_batch_size=4, seed=0))
    assert b["input_ids"].dtype == torch.int64 and b["input_ids"].shape == (4, SEQ_LEN)
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])
    window_ids(torch.cat([b["input_ids"], b["labels"][:, -1:]], 1).numpy(), stream)


def test_next_epoch_uses_a_new_permutation(train):
    n = train.n_windows(SEQ_LEN)
    loader = TokenLoader(train, seq_len=SEQ_LEN, global_batch_size=2, seed=0)
    _, epoch, first = loader.locate(np.arange(n))
    _, epoch2, second = loader.locate(np.arange(n, 2 * n))
    assert set(epoch) == {0} and set(epoch2) == {1}
    assert np.array_equal(np.sort(second), np.arange(n)) and not np.array_equal(first, second)
    loader.samples_consumed = n
    assert loader.epoch == 1 and loader.state_dict()["epoch"] == 1


def test_resume_mid_epoch_equals_uninterrupted(train):
    straight = TokenLoader(train, seq_len=SEQ_LEN, global_batch_size=4, seed=9)
    expected = run(straight, 10)[1]
    first = TokenLoader(train, seq_len=SEQ_LEN, global_batch_size=4, seed=9)
    head = run(first, 4)[1]
    state = first.state_dict()
    assert set(state) == {"samples_consumed", "epoch", "seed", "seq_len", "windows"}
    assert all(isinstance(v, int) for v in state.values())
    resumed = TokenLoader(train, seq_len=SEQ_LEN, global_batch_size=4, seed=123)  # the saved seed wins
    resumed.load_state_dict(state)
    assert np.array_equal(np.concatenate([head, run(resumed, 6)[1]]), expected)


def test_state_saved_on_2_ranks_resumes_on_3_with_no_gap_or_repeat(train):
    batch = 6
    two = [TokenLoader(train, seq_len=SEQ_LEN, global_batch_size=batch, dp_rank=r, dp_size=2, seed=2) for r in range(2)]
    before = [run(l, 5)[0] for l in two]
    states = [l.state_dict() for l in two]
    assert states[0] == states[1]  # state is global
    three = [TokenLoader(train, seq_len=SEQ_LEN, global_batch_size=batch, dp_rank=r, dp_size=3, seed=2)
             for r in range(3)]
    for l in three:
        l.load_state_dict(states[0])
    after = [run(l, 5) for l in three]
    index = np.sort(np.concatenate(before + [a[0] for a in after]))
    assert np.array_equal(index, np.arange(10 * batch))
    # and the rows are the very windows an uninterrupted single-rank run delivers
    single = run(TokenLoader(train, seq_len=SEQ_LEN, global_batch_size=batch, seed=2), 10)[1]
    resumed_rows = np.concatenate([np.concatenate([a[1][s * 2:(s + 1) * 2] for a in after]) for s in range(5)])
    assert np.array_equal(resumed_rows, single[5 * batch:])


def test_state_from_another_seq_len_is_refused(train):
    state = TokenLoader(train, seq_len=SEQ_LEN, global_batch_size=2, seed=0).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        TokenLoader(train, seq_len=SEQ_LEN * 2, global_batch_size=2, seed=0).load_state_dict(state)


def test_global_batch_must_divide_across_ranks(train):
    with pytest.raises(ValueError, match="global_batch_size"):
        TokenLoader(train, seq_len=SEQ_LEN, global_batch_size=5, dp_rank=0, dp_size=2, seed=0)


def test_position_ids_restart_at_every_bos(train):
    loader = TokenLoader(train, seq_len=SEQ_LEN, global_batch_size=64, seed=0, return_positions=True)
    b = next(loader)
    ids, pos = b["input_ids"], b["position_ids"]
    assert (ids == train.bos_id).any(), "no document start in this batch: enlarge it"
    for row_ids, row_pos in zip(ids.tolist(), pos.tolist()):
        expect, p = [], 0
        for t, tok in enumerate(row_ids):
            p = 0 if tok == train.bos_id else (p + 1 if t else 0)
            expect.append(p)
        assert row_pos == expect


def test_mixture_realises_the_weights(shards):
    train, val = ShardSet.open(shards, "train"), ShardSet.open(shards, "val")
    loader = TokenLoader([train, val], seq_len=SEQ_LEN, global_batch_size=10, seed=0, weights=[0.7, 0.3])
    for _ in range(100):
        b = next(loader)
    report = loader.mixture_proportions()
    shares = [r["realised"] for r in report.values()]
    assert abs(shares[0] - 0.7) < 0.01 and abs(shares[1] - 0.3) < 0.01
    assert sum(r["samples"] for r in report.values()) == 1000
    assert report[val.name]["epoch"] >= 1  # the small source cycled into a new epoch
    # each row really comes from its source: val rows are windows of the val stream
    source, _, _ = loader.locate(b["sample_index"].numpy())
    val_stream = np.empty(val.n_tokens, dtype=np.int64)
    val.read(0, val_stream)
    for row, s in zip(torch.cat([b["input_ids"], b["labels"][:, -1:]], 1).numpy(), source):
        found = any(np.array_equal(val_stream[w * SEQ_LEN:w * SEQ_LEN + SEQ_LEN + 1], row)
                    for w in range(val.n_windows(SEQ_LEN)))
        assert found == (s == 1)


def test_validation_batches_are_ordered_and_disjoint_per_rank(shards):
    val = ShardSet.open(shards, "val")
    whole = list(validation_batches(val, SEQ_LEN, batch_size=4))
    assert len(whole) == val.n_windows(SEQ_LEN) // 4
    assert np.array_equal(torch.cat([b["sample_index"] for b in whole]).numpy(), np.arange(4 * len(whole)))
    halves = [list(validation_batches(val, SEQ_LEN, batch_size=4, dp_rank=r, dp_size=2, max_batches=3))
              for r in range(2)]
    for k in range(3):
        assert torch.equal(torch.cat([halves[0][k]["input_ids"], halves[1][k]["input_ids"]]), whole[k]["input_ids"])
