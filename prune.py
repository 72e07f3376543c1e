"""Structured and unstructured pruning (`python main.py --mode=prune`); it lives in
netvlad_toolkit/modes/prune.py."""
from netvlad_toolkit.modes.prune import add_magnitude_masks, prune, prune_structured

__all__ = ['prune', 'prune_structured', 'add_magnitude_masks']
