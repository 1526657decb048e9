"""Export to validated, self-describing ONNX (`ferry export`): fp32 plus int8 and fp16 variants. torch is imported by the submodules only."""
