"""Metrics that models and evaluation both use: ranking metrics (:mod:`~mmrec.metrics.ranking`) and the
quality of semantic-ID codes (:mod:`~mmrec.metrics.codes`).

A leaf package: it imports nothing else from mmrec, so models can report their validation metrics and the
evaluation package can load models without the two importing each other.
"""
