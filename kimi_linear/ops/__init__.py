"""Operators: tensors in, tensors out. No nn.Module, no config, no cache objects."""
