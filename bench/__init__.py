"""Benchmarks: ``bench.run`` (speed and memory, side by side; ``make bench``) and ``bench.scale`` (planning
cost at thousands of simulated ranks; ``make bench-scale``). Results go to ``bench/results/`` (gitignored)."""
