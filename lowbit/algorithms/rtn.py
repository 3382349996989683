"""Round-to-nearest (RTN): every weight to the nearest level of its grid, with the scale (and zero
point) of each tensor, channel or group taken from that slice's own minimum and maximum.

The baseline every published method (GPTQ, AWQ, HQQ) is measured against: no calibration data, no
error feedback; exact for 8-bit weights in practice, lossy for 4-bit ones.
"""

from lowbit.algorithms import ALGORITHMS, Algorithm
from lowbit.nn.qweight import round_to_nearest

ALGORITHMS.add("rtn", Algorithm(round_to_nearest))
