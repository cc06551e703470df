"""Studies run on the library, beside it (not part of what a plugin user imports).

``verify``: the DSA verification study on the small MoE (``python experiments/verify_dsa.py``).
"""
