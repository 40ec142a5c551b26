"""Deployment: ONNX inference (predict), the HTTP server, export variants, the bundle, promotion."""
