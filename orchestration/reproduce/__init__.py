"""`instructray reproduce`: the InstructGPT paper's findings in miniature (see main.py)."""
