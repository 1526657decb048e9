"""ferry: take a PyTorch image classifier to fast, trustworthy ONNX inference."""

__version__ = "0.2.0"
