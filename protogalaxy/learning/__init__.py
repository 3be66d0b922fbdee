"""Models, datasets, partitions, batched local training and attacks."""
