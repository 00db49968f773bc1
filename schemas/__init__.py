"""Wire types of the Resultity network contract and the runtime frame codec.

Submodules are imported one by one on purpose: `schemas.frames` needs only msgpack and is
imported inside the runtime container, the payload models need pydantic.
"""
