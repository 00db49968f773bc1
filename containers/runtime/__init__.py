"""The runtime process that runs inside the container: frames in, engine, frames out."""
