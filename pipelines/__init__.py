"""KFP pipeline definitions (the DAGs) and their compiler; compiled YAML lives in compiled/."""
