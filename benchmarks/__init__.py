"""Benchmark harness: ``python -m benchmarks`` (the project's main job) and the GMM / sort / layer suites.

See ``benchmarks/README.md`` for the commands and the JSON schema, ``benchmarks/RESULTS.md`` for measured tables.
"""
