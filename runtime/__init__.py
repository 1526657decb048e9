"""ferry's lightweight runtime: onnxruntime, numpy and pillow only (never torch).

Nothing is imported eagerly; use `from runtime.classifier import Classifier`.
"""
