"""NetVLAD toolkit: `python main.py --mode=MODE [flags]` (`python main.py --help` lists the modes). The toolkit is
the netvlad_toolkit package; this file is its command line, as `netvlad-toolkit` and `python -m netvlad_toolkit`
are once it is installed."""
import sys

from netvlad_toolkit.cli import main

if __name__ == '__main__':
    sys.exit(main())
