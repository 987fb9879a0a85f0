"""The engine's control plane: plain Python, no torch. The ModelRunner owns the device."""
