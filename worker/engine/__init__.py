"""The worker engine: the poll loop, partitions, their tasks, state and output."""
