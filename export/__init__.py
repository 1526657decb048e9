"""Export to ONNX (issue: export). Stub until then."""
