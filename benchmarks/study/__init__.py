"""The G-SGD reproduction study (issue 7): data, models, methods, a Lightning harness and the protocol.

Run an experiment with ``python -m benchmarks.study.experiments NAME`` from the repository root;
see ``benchmarks/study/README.md``.
"""
