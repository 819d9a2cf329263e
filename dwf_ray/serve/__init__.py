"""Sampling as a service: a Ray Serve app over a finished run root (``app``), its options (``config``), the
wire format (``wire``) and a Python client (``client``). Importing the client needs no Ray."""
