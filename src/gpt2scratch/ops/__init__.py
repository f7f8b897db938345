"""The fused kernels under the model: the output head with its loss, oneDNN weight prepacking, int8 weights."""
