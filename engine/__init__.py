"""The engine: blobs, layers, nets, fillers, devices and model I/O."""
