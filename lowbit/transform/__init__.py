"""Transform: the Recipe, calibration, and the model walk that swaps float modules for
quantized ones."""
