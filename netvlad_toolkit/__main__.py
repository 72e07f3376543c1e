"""`python -m netvlad_toolkit --mode=MODE [flags]`: the same command line as `python main.py`."""
import sys

from netvlad_toolkit.cli import main

sys.exit(main())
