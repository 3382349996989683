"""`lowbit.sklearn`: the public face of the scikit-learn family (lowbit/families/sklearn/).

    q = lowbit.sklearn.quantize(pipeline, bits=8, data=X_check)
    q.save("model.lowbit"); lowbit.sklearn.load("model.lowbit")
"""

from lowbit.families.sklearn import QuantizedEstimator, load, quantize, quantize_model_file

__all__ = ["QuantizedEstimator", "load", "quantize", "quantize_model_file"]
