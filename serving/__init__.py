"""The MNIST prediction service: FastAPI on ONNX Runtime, serving the registry's champion model."""

__version__ = "0.1.0"
