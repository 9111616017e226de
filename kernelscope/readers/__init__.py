"""Buffer readers: the memory layouts of ring, perf and user ring buffers, read into batches."""
