"""compile.py's streaming pieces on their own (the splits themselves: tests/stages/test_ratchet.py)."""
import pyarrow as pa

from builder.compile import grouped_batches


def test_groups_come_whole_whatever_the_batches_and_null_keys_are_a_group():
    keys = ["a", "a", "b", "b", "b", None, None, "c"]
    table = pa.table({"k": keys, "v": list(range(len(keys)))})
    for size in (1, 2, 3, 8):
        frames = list(grouped_batches(table.to_batches(max_chunksize=size), ["k"]))
        rows = [(r["k"], r["v"]) for f in frames for r in f.iter_rows(named=True)]
        assert rows == list(zip(keys, range(len(keys))))  # nothing lost, nothing repeated, in order
        for frame in frames:  # no group is split between two frames
            others = {k for f in frames if f is not frame for k in f["k"].to_list()}
            assert not set(frame["k"].to_list()) & others
