"""Buffer readers: the memory layouts of ring, perf and user ring buffers, read into batches.

base.py is the `Reader` contract the ring (ring.py) and perf (perf.py) readers keep; batch.py the
`Batch` they return; user_ring.py writes the other way, into a BPF_MAP_TYPE_USER_RINGBUF.
"""
