"""Evaluation: every benchmark the paper reports, tables, the HTML report, predict.

Map: ``benchmarks/`` read each public format into ``EvalSample``s; ``runner`` asks a model
(``MedSightInference`` or anything with the same ``answer``) in batches and scores each answer
(``metrics``); ``results_io``/``tables``/``examples``/``report`` turn the scores into
``results.json``, paper-shaped tables and a self-contained HTML report; ``stage`` is the
pipeline's ``evaluate`` stage; ``predict``/``dicom_io`` serve one image. Variants are compared
by ``medsight.stages.ablations``; generated data is built by ``medsight.data.datagen``.
"""
