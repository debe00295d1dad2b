"""Detection benchmark: train a zoo of healthy and deliberately broken models under ``Sentinel``.

Run it with ``python -m benchmarks.detection`` (see ``README.md`` next to this file). The pieces:

- :mod:`benchmarks.detection.zoo`: small models, losses and data builders (CPU, seconds);
- :mod:`benchmarks.detection.cases`: the registry of healthy and faulty cases, with expected check ids;
- :mod:`benchmarks.detection.runner`: trains cases, scores verdicts, prints the table and summary.
"""
