"""Wire <-> domain conversion, all of it: ``tensors`` (arrays and tokens), ``model_input`` (chunks to tokens and
images), ``requests`` (sessions, runs, optimizer steps, weights), ``forward_backward`` (forward/backward bodies),
``sampling`` (samplers and sample requests) and ``results`` (results and records back to JSON or protobuf).
Routes never build domain objects or response bodies by hand."""
