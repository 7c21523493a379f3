"""On-demand benchmarks (never run in CI). See docs/benchmarks.md."""
