"""Deployment: ONNX inference (onnx_runtime, predict), the HTTP server, export variants (registry and
builders), the bundle, promotion."""
