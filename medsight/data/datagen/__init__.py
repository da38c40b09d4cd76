"""Generated training and test data of the paper (App. B, C).

- DiagSeg-style diagnostic QA from image-mask-description triples (``diagseg_builder``);
- grounding instruction conversations built around region codes (``grounding_conversations``).
Text comes from a deterministic template generator (offline, tests, tiny preset) or from any
OpenAI-compatible chat endpoint (``llm_client``); every generated item is checked against its
mask and description (``validation``) and written to a resumable JSONL file (``jsonl_store``).
"""
