"""Loader: exact epoch coverage across ranks, resume (also onto another dp_size), mixtures, positions, validation,
shard-set identity, and mixture changes on resume (continued pretraining) that repeat no sample of a kept set."""

import json
import shutil

import numpy as np
import pytest
import torch

from data_pipeline.build import build_shards
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
    assert {"samples_consumed", "epoch", "seed", "seq_len", "windows"} <= set(state)
    assert all(isinstance(state[k], int) for k in ("samples_consumed", "epoch", "seed", "seq_len", "windows"))
    assert json.loads(json.dumps(state)) == state  # it is stored in the checkpoint's train_state.json
    resumed = TokenLoader(train, seq_len=SEQ_LEN, global_batch_size=4, seed=123)  # the saved seed wins
    resumed.load_state_dict(state)
    assert np.array_equal(np.concatenate([head, run(resumed, 6)[1]]), expected)


def test_state_saved_on_2_ranks_resumes_on_3_with_no_gap_or_repeat(train):
    batch = 6
    two = [TokenLoader(train, seq_len=SEQ_LEN, global_batch_size=batch, dp_rank=r, dp_size=2, seed=2) for r in range(2)]
    before = [run(loader, 5)[0] for loader in two]
    states = [loader.state_dict() for loader in two]
    assert states[0] == states[1]  # state is global
    three = [TokenLoader(train, seq_len=SEQ_LEN, global_batch_size=batch, dp_rank=r, dp_size=3, seed=2)
             for r in range(3)]
    for loader in three:
        loader.load_state_dict(states[0])
    after = [run(loader, 5) for loader in three]
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


# -- shard-set identity and mixture changes on resume --------------------------------------------------------


@pytest.fixture(scope="module")
def other(tmp_path_factory, small_corpus, tokenizer):
    """A second, smaller shard set (another play, one document per line) built with the same tokenizer."""
    out = tmp_path_factory.mktemp("other") / "set"
    build_shards([str(small_corpus["lines"])], out, tokenizer, txt_mode="line", shard_tokens=20_000, num_proc=1,
                 progress=False)
    return ShardSet.open(out, "train")


def tokens_of(shardset: ShardSet) -> np.ndarray:
    out = np.empty(shardset.n_tokens, dtype=np.int64)
    shardset.read(0, out)
    return out


def per_set(rows: np.ndarray, *sets: ShardSet) -> dict[str, list[int]]:
    """For each set, the windows (ids in its raw stream) the rows delivered from it, in delivery order."""
    lookups = {s.name: {w.tobytes(): i for i, w in enumerate(stream_windows(tokens_of(s)))} for s in sets}
    out = {s.name: [] for s in sets}
    for r in rows:
        key = np.ascontiguousarray(r).tobytes()
        hits = [name for name, lookup in lookups.items() if key in lookup]
        assert len(hits) == 1, "a row is not a window of exactly one of the sets"
        out[hits[0]].append(lookups[hits[0]][key])
    return out


def saved(loader) -> dict:
    """The loader's state as a checkpoint stores it (through JSON)."""
    return json.loads(json.dumps(loader.state_dict()))


def test_identity_is_the_content_not_the_path(shards, other, tmp_path):
    copy = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(shards, copy)
    original, moved = ShardSet.open(shards, "train"), ShardSet.open(copy, "train")
    assert moved.name != original.name and moved.identity == original.identity
    assert len(original.identity) == 64 and int(original.identity, 16) >= 0  # a sha256, in hex
    assert ShardSet.open(shards, "val").identity != original.identity
    assert other.identity != original.identity
    # what the identity covers: the shards' checksums and the tokenizer
    manifest = json.loads((copy / "manifest.json").read_text())
    for edit in ("shard", "tokenizer"):
        changed = json.loads(json.dumps(manifest))
        if edit == "shard":
            changed["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
        else:
            changed["tokenizer"]["sha256"] = "0" * 64
        (copy / "manifest.json").write_text(json.dumps(changed))
        assert ShardSet.open(copy, "train", verify=False).identity != original.identity, edit


def test_default_stream_is_the_documented_one(train, other):
    """No mixture change: sample k of a source is window k of its seeded per-epoch Feistel order, as always."""
    n = train.n_windows(SEQ_LEN)
    loader = TokenLoader(train, seq_len=SEQ_LEN, global_batch_size=4, seed=3)
    across = np.arange(n - 5, n + 5)  # across the epoch boundary
    expect = [Permutation(n, "windows", 3, 0, int(i // n))([i % n])[0] for i in across]
    assert window_ids(torch.cat([(b := loader.samples(across))["input_ids"], b["labels"][:, -1:]], 1).numpy(),
                      tokens_of(train)) == expect
    # a mixture: each source's own stream is the same function of (seed, source index, k)
    mixed = TokenLoader([train, other], seq_len=SEQ_LEN, global_batch_size=10, seed=3, weights=[0.6, 0.4])
    got = per_set(run(mixed, 30)[1], train, other)
    for s, source in enumerate([train, other]):
        n_s = source.n_windows(SEQ_LEN)
        assert got[source.name] == [Permutation(n_s, "windows", 3, s, k // n_s)([k % n_s])[0]
                                    for k in range(len(got[source.name]))]


def test_resume_with_the_same_mixture_is_exact(train, other):
    def make(seed):
        return TokenLoader([train, other], seq_len=SEQ_LEN, global_batch_size=8, seed=seed, weights=[0.7, 0.3])
    expected = run(make(1), 10)[1]
    first = make(1)
    head = run(first, 4)[1]
    resumed = make(99)  # the saved seed wins
    assert resumed.load_state_dict(saved(first)) is None  # nothing changed, nothing to log
    assert np.array_equal(np.concatenate([head, run(resumed, 6)[1]]), expected)


def test_state_without_identities_still_resumes(train, other):
    """A state saved before shard sets had identities (five ints) loads when nothing changed."""
    first = TokenLoader(train, seq_len=SEQ_LEN, global_batch_size=4, seed=2)
    head = run(first, 3)[1]
    old = {k: first.state_dict()[k] for k in ("samples_consumed", "epoch", "seed", "seq_len", "windows")}
    resumed = TokenLoader(train, seq_len=SEQ_LEN, global_batch_size=4, seed=0)
    resumed.load_state_dict(old)
    expected = run(TokenLoader(train, seq_len=SEQ_LEN, global_batch_size=4, seed=2), 6)[1]
    assert np.array_equal(np.concatenate([head, run(resumed, 3)[1]]), expected)
    with pytest.raises(ValueError, match="windows"):  # it cannot say which set is which: no change allowed
        TokenLoader([train, other], seq_len=SEQ_LEN, global_batch_size=4).load_state_dict(old, allow_change=True)


@pytest.mark.parametrize("change", ["added", "reordered", "reweighted"])
def test_a_changed_mixture_is_refused_without_allow_change(train, other, change):
    before = {"added": ([train], None), "reordered": ([train, other], None),
              "reweighted": ([train, other], [0.5, 0.5])}[change]
    after = {"added": ([train, other], None), "reordered": ([other, train], None),
             "reweighted": ([train, other], [0.8, 0.2])}[change]
    first = TokenLoader(before[0], seq_len=SEQ_LEN, global_batch_size=4, weights=before[1])
    run(first, 2)
    second = TokenLoader(after[0], seq_len=SEQ_LEN, global_batch_size=4, weights=after[1])
    with pytest.raises(ValueError, match="allow_change") as e:
        second.load_state_dict(saved(first))
    assert "\n" not in str(e.value)
    assert second.samples_consumed == 0  # refused before touching anything


def test_added_set_leaves_the_kept_set_unrepeated(train, other):
    """[A] for 5 steps, then [A, B] 50/50 with another seed: A goes on through the rest of its epoch with no
    window of the first 5 steps again, B starts at its start, and the realised shares are this mixture's."""
    batch, n_a = 64, train.n_windows(SEQ_LEN)
    first = TokenLoader(train, seq_len=SEQ_LEN, global_batch_size=batch, seed=4)
    head = run(first, 5)[1]
    second = TokenLoader([train, other], seq_len=SEQ_LEN, global_batch_size=batch, seed=5, weights=[1, 1])
    change = second.load_state_dict(saved(first), allow_change=True)
    assert "\n" not in change and f"kept {train.name}" in change and f"added {other.name}" in change, change
    assert second.samples_consumed == 5 * batch
    batches = []
    while second.mixture_proportions()[train.name]["samples"] + batch <= n_a:  # until A's epoch would wrap
        batches.append(next(second))
    steps, tail = len(batches), torch.cat([torch.cat([b["input_ids"], b["labels"][:, -1:]], 1) for b in batches])
    before, after = per_set(head, train)[train.name], per_set(tail.numpy(), train, other)
    assert len(before) == 5 * batch and len(after[train.name]) > n_a - 5 * batch - batch
    delivered = before + after[train.name]
    assert len(set(delivered)) == len(delivered)  # no window of A twice, across both mixtures
    fresh = per_set(run(TokenLoader([train, other], seq_len=SEQ_LEN, global_batch_size=batch, seed=5,
                                    weights=[1, 1]), steps)[1], train, other)[other.name]
    assert after[other.name] == fresh  # B: the very stream a run that began with [A, B] gets from it
    report = second.mixture_proportions()
    assert report[train.name]["samples"] == len(delivered) and report[other.name]["samples"] == len(fresh)
    assert all(abs(r["realised"] - 0.5) < 0.01 and r["weight"] == 0.5 for r in report.values())
    with pytest.raises(ValueError, match="before"):  # the samples before the change belong to the old mixture
        second.samples(np.arange(2))


def test_reordered_sets_both_continue_and_the_change_survives_a_resume(train, other):
    """[A, B] -> [B, A] with other weights: each set's windows are exactly the continuation of its own stream;
    a checkpoint taken after the change resumes the new mixture exactly, with no allow_change needed."""
    batch = 8
    straight = per_set(run(TokenLoader([train, other], seq_len=SEQ_LEN, global_batch_size=batch, seed=6,
                                       weights=[0.7, 0.3]), 60)[1], train, other)
    first = TokenLoader([train, other], seq_len=SEQ_LEN, global_batch_size=batch, seed=6, weights=[0.7, 0.3])
    head = run(first, 10)[1]

    def swapped():
        return TokenLoader([other, train], seq_len=SEQ_LEN, global_batch_size=batch, seed=6, weights=[0.5, 0.5])
    second = swapped()
    change = second.load_state_dict(saved(first), allow_change=True)
    assert f"kept {train.name}" in change and f"kept {other.name}" in change and "added" not in change, change
    middle = run(second, 10)[1]
    third = swapped()
    assert third.load_state_dict(saved(second)) is None
    tail = run(third, 10)[1]
    got = per_set(np.concatenate([head, middle, tail]), train, other)
    for source in (train, other):
        assert got[source.name] == straight[source.name][:len(got[source.name])], source.name
    assert len(got[other.name]) > 10 * batch * 0.3 + 20 * batch * 0.5 - 2  # B really took its new share


def test_a_dropped_set_resumes_where_it_stopped_when_added_back(train, other):
    batch = 8
    straight = per_set(run(TokenLoader([train, other], seq_len=SEQ_LEN, global_batch_size=batch, seed=7), 80)[1],
                       train, other)
    first = TokenLoader([train, other], seq_len=SEQ_LEN, global_batch_size=batch, seed=7)
    head = run(first, 5)[1]
    only_b = TokenLoader(other, seq_len=SEQ_LEN, global_batch_size=batch, seed=7)
    assert f"dropped [{train.identity[:12]}]" in only_b.load_state_dict(saved(first), allow_change=True)
    middle = run(only_b, 3)[1]
    both = TokenLoader([train, other], seq_len=SEQ_LEN, global_batch_size=batch, seed=7)
    assert f"kept {train.name}" in both.load_state_dict(saved(only_b), allow_change=True)
    got = per_set(np.concatenate([head, middle, run(both, 5)[1]]), train, other)
    for source in (train, other):
        assert len(got[source.name]) <= len(straight[source.name])  # the reference run is long enough
        assert got[source.name] == straight[source.name][:len(got[source.name])], source.name


def test_set_weights_continues_each_stream_and_resumes_with_the_weights_in_force(train, other):
    """data.mixing=adaptive's change mid-run: from the next sample the new weights, each source going on in its own
    stream (window k of its seeded order, k counting on across the change: nothing repeats); a state saved after it
    resumes with those weights in an adaptive loader, and is refused by a fixed one still at the config's."""
    def make(**kw):
        return TokenLoader([train, other], seq_len=SEQ_LEN, global_batch_size=16, seed=3, weights=[0.8, 0.2], **kw)
    loader = make(adaptive=True)
    head = run(loader, 4)[1]
    change = loader.set_weights([0.25, 0.75])
    assert "\n" not in change and "0.8 -> 0.25" in change and "0.2 -> 0.75" in change, change
    state = saved(loader)
    tail = run(loader, 8)[1]
    got = per_set(np.concatenate([head, tail]), train, other)
    for s, source in enumerate([train, other]):
        n_s = source.n_windows(SEQ_LEN)
        assert got[source.name] == [Permutation(n_s, "windows", 3, s, k // n_s)([k % n_s])[0]
                                    for k in range(len(got[source.name]))]
    after = per_set(tail, train, other)
    assert len(after[other.name]) == round(0.75 * len(tail))  # the new weights, exactly over the 128 samples
    resumed = make(adaptive=True)
    assert resumed.load_state_dict(state) is None
    assert resumed.mixture.weights.tolist() == [0.25, 0.75]
    assert np.array_equal(run(resumed, 8)[1], tail)
    with pytest.raises(ValueError, match="allow_change"):
        make().load_state_dict(state)
