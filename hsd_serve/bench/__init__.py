"""`hsd-serve bench`: side-by-side benchmarks of AR, our lossless speculative methods and
Hugging Face transformers' heterogeneous assisted generation (DESIGN.md §8).

Modules: ``datasets`` (raw prompts from shared/assets/datasets), ``metrics`` (S_ideal, α),
``runner`` (in-process runs, calibration of the cost ratio c, aggregation), ``hf_uag`` (the
transformers baseline), ``remote`` (a running service over gRPC/HTTP, concurrency), ``report``
(results.json, results.md, plots), ``cli`` (``add_bench_parser``/``main``).
"""

from hsd_serve.bench.metrics import ideal_speedup

__all__ = ["ideal_speedup"]
