"""Running a model: generation, CUDA-graph decoding, the memory plan, building on the device, int8 experts."""
