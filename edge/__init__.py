"""Torch-free edge runtime: run exported ONNX bundles with numpy, onnxruntime and tokenizers only."""
