import os as _os
import sys as _sys

__version__ = "0.1.0"

try:
    _os.getcwd()
except FileNotFoundError:  # torch's MKL then dies at import with a bare "FATAL ERROR: Cannot load libtorch_cpu.so"
    _sys.exit("Error: the current folder no longer exists (it was removed or moved): cd to another folder")
