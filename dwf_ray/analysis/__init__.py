"""Analyses used by the benchmarks (transfer learning, excitation); not a pipeline stage."""
