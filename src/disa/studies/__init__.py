"""Measurements on the exact testbed that back a default or a claim in the docs (``python -m disa.studies.<name>``)."""
