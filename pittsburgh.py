"""The Pittsburgh and Tokyo dbStruct .mat reader, at the top as in the PyTorch port; it lives in
netvlad_toolkit/datasets/pittsburgh.py."""
from netvlad_toolkit.datasets.pittsburgh import parse_db_struct, read_split

__all__ = ['parse_db_struct', 'read_split']
