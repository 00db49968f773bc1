"""Runtime images and the in-container runtime process."""
