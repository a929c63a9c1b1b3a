"""Latency profiling from the pipeline's own stage timings: per-stage statistics, side-by-side
comparisons, JSON / CSV / Chrome-trace / PNG outputs, and Jetson tegrastats sampling."""
