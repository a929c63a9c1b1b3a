"""Serving: the runtime behind Triton Inference Server, and a writer of Triton model repositories.

    blip2-edge serve out/toy --http-port 8000           # tritonserver (bundled with nvidia-pytriton)
    blip2-edge triton-repo out/toy repo/                # a repository, and the tritonserver line that serves it

The serving model is a thin layer over Blip2Pipeline: `jobs` turns one request's tensors into a
checked job (or a client error) and runs a dynamic batch grouped by generation options;
`triton_model` (with `pipeline_model`, `streaming`, `ensemble_steps`) is what Triton's Python
backend runs; `model_config`, `repository` and `ensemble` write the model repository; `server`
finds the tritonserver binary, checks where it is to listen, and builds its command and
environment (serve starts it, triton-repo prints it). Nothing here is imported by the rest of
the runtime, and nvidia-pytriton is only located (never imported) by `server`.
"""
