"""Evaluation: every benchmark the paper reports, tables, the HTML report, predict, ablations.

Map: ``benchmarks/`` read each public format into ``EvalSample``s; ``runner`` asks a model
(``MedSightInference`` or anything with the same ``answer``) in batches and scores each answer
(``metrics``, ``region_tokens``); ``results_io``/``tables``/``examples``/``report`` turn the
scores into ``results.json``, paper-shaped tables and a self-contained HTML report; ``stage``
is the pipeline's ``evaluate`` stage; ``predict``/``dicom_io`` serve one image; ``ablations``
runs config variants; ``datagen/`` builds the paper's generated data (App. B, C).
"""
