"""Tools around the engine, not parts of it: the demo, and the checkpointable
workload containers the tests, the demo and the benchmarks run."""
