"""Pipeline stages: orchestration and I/O around the pure math (sample, label, fit_z, train, evaluate)."""
