"""The G-SGD reproduction study (issue 7): data, models, methods, a Lightning harness and the protocol.

Run an experiment with ``python -m experiments.study.experiments NAME`` from the repository root;
see ``experiments/study/README.md``.
"""
