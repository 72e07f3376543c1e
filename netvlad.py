"""The NetVLAD layer, where the PyTorch port's users import it from (`from netvlad import NetVLAD`); it lives in
netvlad_toolkit/model/netvlad.py."""
from netvlad_toolkit.model.netvlad import GlobalPool, NetVLAD

__all__ = ['NetVLAD', 'GlobalPool']
