"""Our own copy of the Tinker protobuf schema (``tinker_public.proto``) and its generated module."""
