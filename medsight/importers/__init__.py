"""Importers of checkpoints trained elsewhere (the authors' released MedSIGHT weights)."""
