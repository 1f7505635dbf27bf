"""Caches: hand-computed traces for SIEVE, LRU, static and Belady; rows byte-identical through every policy and
tier; misses, and only misses, reach the wrapped store; the victim buffer catches a soon-needed evicted row."""

from collections import OrderedDict

import numpy as np
import pytest
import torch
from plait.storage.belady import BeladyPolicy
from plait.storage.cache import CachedStore, DeviceCache, fill_static
from plait.storage.cache_policy import (
    LRUPolicy,
    SievePolicy,
    StaticPolicy,
    access_counts,
    top_k_ids,
)
from plait.storage.store import ArrayStore, RowStore


class RecordingStore(ArrayStore):
    """An in-memory store that also keeps the ids of every read it was asked for."""

    def __init__(self, array):
        super().__init__(array)
        self.reads = []

    def read(self, ids):
        self.reads.append(np.asarray(ids).tolist())
        return super().read(ids)


def random_rows(n, width=4, seed=0):
    """Arbitrary bytes viewed as float32 (NaNs with payloads included): equality must be byte-for-byte."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 4 * width), dtype=np.uint8).view(np.float32)


def run_trace(policy, trace):
    """Feed one id per batch; return per-access hits and {position: evicted id}."""
    hits, evicted = [], {}
    for pos, x in enumerate(trace):
        hit, _ = policy.lookup(np.array([x]))
        hits.append(bool(hit[0]))
        if not hit[0]:
            adm = policy.admit(np.array([x]))
            if adm.evicted_ids.size:
                evicted[pos] = int(adm.evicted_ids[0])
    return hits, evicted


TRACE = [1, 2, 3, 1, 4, 2, 1, 5, 2, 6, 7]


# Capacity 3 on TRACE. SIEVE, queue written tail..head, * = visited, ^ = hand:
# 1 2 3 -> [1 2 3]; 1 hit -> [1* 2 3]; 4: hand clears 1, evicts 2 -> [1 3^ 4]; 2: evicts 3 -> [1 4^ 2];
# 1 hit -> [1* 4^ 2]; 5: evicts 4 -> [1* 2^ 5]; 2 hit -> [1* 2* 5]; 6: clears 2, evicts 5 (the head, so the
# hand wraps to the tail) -> [1* 2 6]; 7: clears 1, evicts 2 -> [1 6 7].
# LRU, least recent first: [2 3 1] after 1 2 3 1; 4 evicts 2 -> [3 1 4]; 2 evicts 3 -> [1 4 2];
# 1 hit -> [4 2 1]; 5 evicts 4 -> [2 1 5]; 2 hit -> [1 5 2]; 6 evicts 1 (SIEVE kept it) -> [5 2 6];
# 7 evicts 5 -> [2 6 7].
@pytest.mark.parametrize("policy_class, evicted, resident", [
    (SievePolicy, {4: 2, 5: 3, 7: 4, 9: 5, 10: 2}, [1, 6, 7]),
    (LRUPolicy, {4: 2, 5: 3, 7: 4, 9: 1, 10: 5}, [2, 6, 7]),
], ids=["sieve", "lru-differs-where-sieve-keeps-the-reused-row"])
def test_sieve_and_lru_hand_traces(policy_class, evicted, resident):
    policy = policy_class(capacity=3, num_rows=10)
    hits, got = run_trace(policy, TRACE)
    assert [i for i, h in enumerate(hits) if h] == [3, 6, 8]
    assert got == evicted
    assert sorted(policy.resident_ids()) == resident


def test_static_cache_holds_the_hottest_rows_loaded_in_one_read():
    # Access counts over the batches: id 1 four times, id 0 twice, ids 2 and 3 once -> the static set is {1, 0}.
    batches = [[0, 1], [1, 2], [1, 3], [0, 1], [2]]
    counts = access_counts(batches, num_rows=5)
    assert list(top_k_ids(counts, 2)) == [1, 0]
    store = RecordingStore(random_rows(5))
    cache = CachedStore(store, StaticPolicy(2, 5, scores=counts), capacity_rows=2)
    assert fill_static(cache) == 2 and store.reads == [[1, 0]]
    for b in batches:
        np.testing.assert_array_equal(cache.read(b).view(np.uint8), store.array[b].view(np.uint8))
    # Hits: [0 1] 2, [1 2] 1, [1 3] 1, [0 1] 2, [2] 0 -> 6 of 9; 2 and 3 are never admitted, so 2 misses twice.
    assert store.reads[1:] == [[2], [3], [2]]
    s = cache.stats()
    assert (s["host_hits"], s["host_misses"], s["host_hit_rate"]) == (6, 3, 6 / 9)
    assert s["rows_read"] == 2 + 3  # the fill, then the misses


def test_belady_hand_trace_evicts_the_row_needed_last_and_bypasses_rows_never_needed():
    # Capacity 2, one id per batch: 1 2 3 1 3 2.
    # b0, b1 fill {1, 2}. b2: 3 misses; next uses after b2: 1 at b3, 3 at b4, 2 at b5 -> evict 2: {1, 3}.
    # b3: 1 hit. b4: 3 hit. b5: 2 misses; nothing is used again -> residents stay, 2 is not admitted.
    trace = [1, 2, 3, 1, 3, 2]
    policy = BeladyPolicy(capacity=2, num_rows=10, future=[[x] for x in trace])
    hits, evicted = run_trace(policy, trace)
    assert hits == [False, False, False, True, True, False]
    assert evicted == {2: 2}
    assert sorted(policy.resident_ids()) == [1, 3]
    # LRU on the same trace hits once (b4): Belady's lookahead is worth a hit here.
    assert sum(run_trace(LRUPolicy(2, 10), trace)[0]) == 1
    # With a window of 1 batch only the next batch counts: at b2 neither 2 nor 3 is needed within it, residents
    # win ties, so 3 is not admitted; at b4 (3 misses) 2 is needed at b5, 1 and 3 never -> 1 stays, 3 bypassed.
    hits, evicted = run_trace(BeladyPolicy(2, 10, future=[[x] for x in trace], window=1), trace)
    assert hits == [False, False, False, True, False, True] and evicted == {}


def test_belady_cache_refuses_a_read_that_is_not_in_the_future_it_was_given():
    store = ArrayStore(random_rows(10))
    cache = CachedStore(store, "belady", capacity_rows=2)
    cache.set_future([[1, 2], [3]])
    cache.read([1, 2])
    with pytest.raises(ValueError, match=r"row id 7 is not in the next\); call set_future with the batches in order"):
        cache.read([7])


def textbook_sieve_batch(queue, visited, hand, batch, capacity):
    """Reference SIEVE over a Python list (tail first): mark the batch's hits, then insert its distinct misses
    one at a time. Returns the new hand and the ids evicted."""
    misses = []
    for x in batch:
        if x in visited:
            visited[x] = True
        elif x not in misses:
            misses.append(x)
    evicted = []
    for x in misses:
        if len(queue) == capacity:
            i = hand or 0
            while visited[queue[i]]:
                visited[queue[i]] = False
                i = (i + 1) % len(queue)
            evicted.append(queue.pop(i))
            del visited[evicted[-1]]
            hand = i if i < len(queue) else None
        queue.append(x)
        visited[x] = False
    return hand, evicted


def test_a_belady_tier_below_another_follows_the_batches_it_does_not_see():
    # The host tier sees only the device tier's misses, and nothing when the device tier hits a whole batch.
    rng = np.random.default_rng(5)
    store = RecordingStore(random_rows(200))
    batches = [rng.integers(0, 200, size=int(rng.integers(1, 40))) for _ in range(60)]
    batches[10:13] = [batches[9]] * 3  # the device tier hits these entirely
    host = CachedStore(store, "belady", capacity_rows=50)
    host.set_future(batches)
    device = DeviceCache(host, "lru", capacity_rows=45)
    for b in batches:
        assert device.read(b).cpu().numpy().tobytes() == store.array[b].tobytes()
    assert host.policy.lookahead.cursor <= len(batches) - 1 and device.stats()["host_hits"] > 0


def test_batched_sieve_matches_the_textbook_algorithm_on_random_traces():
    for seed in range(40):
        rng = np.random.default_rng(seed)
        capacity, n = int(rng.integers(1, 10)), int(rng.integers(5, 40))
        policy, queue, visited, hand = SievePolicy(capacity, n), [], {}, None
        for _ in range(40):  # batch sizes up to 3x the capacity: the hand passes the head within a batch
            batch = rng.integers(0, n, size=int(rng.integers(1, 3 * capacity + 3)))
            resident = set(queue)
            hand, evicted = textbook_sieve_batch(queue, visited, hand, batch.tolist(), capacity)
            hit, _ = policy.lookup(batch)
            misses = batch[~hit][np.sort(np.unique(batch[~hit], return_index=True)[1])]
            adm = policy.admit(misses)
            assert sorted(adm.evicted_ids.tolist()) == sorted(set(evicted) & resident)
            assert policy.id_of[policy.queue].tolist() == queue  # same objects, same order
            assert policy.visited[policy.queue].tolist() == [visited[x] for x in queue]
            assert policy.hand == (hand or 0)
            assert [x in visited for x in misses.tolist()] == (adm.slots >= 0).tolist()


def test_batched_lru_keeps_exactly_what_one_access_at_a_time_would():
    rng = np.random.default_rng(1)
    policy, reference = LRUPolicy(capacity=6, num_rows=30), OrderedDict()
    for _ in range(50):
        batch = rng.integers(0, 30, size=int(rng.integers(1, 15)))
        hit, _ = policy.lookup(batch)
        miss = batch[~hit]
        policy.admit(miss[np.sort(np.unique(miss, return_index=True)[1])])
        for x in batch.tolist():
            reference[x] = reference.pop(x, None)
            if len(reference) > 6:
                reference.popitem(last=False)
        assert sorted(policy.resident_ids()) == sorted(reference)


@pytest.mark.parametrize("policy", ["static", "sieve", "lru", "belady"])
def test_rows_are_byte_identical_through_every_policy(policy):
    rng = np.random.default_rng(7)
    store = RecordingStore(random_rows(500, width=3))
    # Skewed ids with duplicates; some batches are larger than the cache.
    batches = [rng.zipf(1.3, size=int(rng.integers(1, 300))) % 500 for _ in range(40)]
    cache = CachedStore(store, policy, capacity_rows=64, victim_rows=8 if policy == "sieve" else 0)
    cache.set_future(batches)
    for b in batches:
        rows = cache.read(b)
        assert rows.shape == (b.size, 3) and rows.dtype == np.float32
        assert rows.tobytes() == store.array[b].tobytes()
    s = cache.stats()
    total = sum(b.size for b in batches)
    assert s["host_hits"] + s["host_misses"] == s["host_rows_read"] == total
    assert 0 < s["host_hit_rate"] < 1
    # Each read asks the store once, for its distinct misses not held by the victim buffer.
    assert s["rows_read"] == sum(len(r) for r in store.reads) == sum(len(set(r)) for r in store.reads)
    assert s["rows_read"] + s.get("host_victim_hits", 0) <= s["host_misses"]


def test_tiers_compose_and_report_hit_rates_per_tier():
    store = RecordingStore(random_rows(300))
    host = CachedStore(store, "sieve", capacity_rows=100)
    device = DeviceCache(host, "lru", capacity_rows=20)
    assert isinstance(host, RowStore) and isinstance(device, RowStore)
    rng = np.random.default_rng(3)
    for _ in range(30):
        ids = rng.zipf(1.5, size=50) % 300
        rows = device.read(ids)
        assert isinstance(rows, torch.Tensor) and rows.device == device.device
        assert rows.cpu().numpy().tobytes() == store.array[ids].tobytes()
    s = device.stats()
    assert s["device_rows_read"] == 1500 and s["device_hits"] + s["device_misses"] == 1500
    assert 0 < s["host_rows_read"] <= s["device_misses"]  # the host tier sees the device tier's distinct misses
    assert s["rows_read"] == sum(len(r) for r in store.reads) <= s["host_misses"]  # the store sees host misses
    assert 0 < s["device_hit_rate"] < 1 and 0 < s["host_hit_rate"] < 1
    with pytest.raises(ValueError, match="tier name 'host' is already used"):
        CachedStore(host, "lru", capacity_rows=10)


def test_victim_buffer_serves_an_evicted_row_that_is_needed_soon():
    # LRU, capacity 2, victim buffer of 1 row; batches 1 2 3 1.
    # b2: 3 evicts 1, which the future needs at b3 -> kept in the victim buffer.
    # b3: 1 misses the cache but comes from the victim buffer, not the store; it evicts 2, needed never -> dropped.
    store = RecordingStore(random_rows(10))
    cache = CachedStore(store, "lru", capacity_rows=2, victim_rows=1)
    batches = [[1], [2], [3], [1]]
    cache.set_future(batches)
    for b in batches:
        assert cache.read(b).tobytes() == store.array[b].tobytes()
    assert store.reads == [[1], [2], [3]]
    s = cache.stats()
    assert (s["host_misses"], s["host_victim_hits"], s["rows_read"]) == (4, 1, 3)
    assert cache.victim.kept == 1 and (cache.victim.ids == -1).all()


def test_host_buffer_is_pinned_only_when_cuda_is_available():
    cache = CachedStore(ArrayStore(random_rows(10)), "lru", capacity_rows=4)
    assert cache.pinned == torch.cuda.is_available()
    assert not CachedStore(ArrayStore(random_rows(10)), "lru", capacity_rows=4, pin=False).pinned
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin=True .* needs CUDA"):
            CachedStore(ArrayStore(random_rows(10)), "lru", capacity_rows=4, pin=True)


def test_bad_ids_and_policies_are_named():
    cache = CachedStore(ArrayStore(random_rows(10)), "sieve", capacity_rows=4)
    with pytest.raises(IndexError, match=r"row id 10 out of range \[0, 10\)"):
        cache.read([3, 10])
    with pytest.raises(ValueError, match="unknown cache policy 'fifo'; choose one of"):
        CachedStore(ArrayStore(random_rows(10)), "fifo", capacity_rows=4)
