"""DISA inside the engines users already run: TRL (``trl.py``), veRL (``verl.py``).

Each module imports its engine lazily, so ``import disa`` never needs them; install the extra
(``pip install disa[trl]``, ``disa[verl]``) to use one. The losses are ours (``disa.objectives``): these
modules only move the engine's tensors into our objective's inputs.
"""
