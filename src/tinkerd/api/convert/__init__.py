"""Wire <-> domain conversion, all of it: ``tensors`` (arrays and tokens), ``requests`` (training requests, sessions,
runs), ``sampling`` (samplers and sample requests) and ``results`` (results and records back to JSON or protobuf).
Routes never build domain objects or response bodies by hand."""
