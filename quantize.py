"""int8 quantization, static and QAT (`python main.py --mode=quantize`); it lives in
netvlad_toolkit/modes/quantize.py."""
from netvlad_toolkit.modes.quantize import quantize, quantize_qat, quantize_static

__all__ = ['quantize', 'quantize_static', 'quantize_qat']
