"""llama.cpp's own quantizer (`llama_model_quantize`, what `llama-quantize` runs) on a GGUF file, through
the `cyllama` wheel, in a child process: a llama.cpp abort ends this child, not the run.

Standalone (imports only cyllama); quantbench.quant.backends.llamacpp runs it as

    PYTHON llama_cpp_quantize.py IN.gguf OUT.gguf FTYPE THREADS  -> one JSON line {"seconds": ...}

FTYPE is llama.h's `llama_ftype` number (gguf.LlamaFileType: 15 = MOSTLY_Q4_K_M, 30 = MOSTLY_IQ4_XS).
cyllama 0.2.18 leaves `imatrix` and `tt_overrides` read-only (NULL): no importance matrix and no
per-tensor type overrides reach the quantizer through it.
"""
from __future__ import annotations

import json
import sys
import time


def main(inp: str, out: str, ftype: int, threads: int) -> dict:
    from cyllama.llama import llama_cpp as L

    L.disable_logging()
    params = L.LlamaModelQuantizeParams()
    params.ftype = ftype
    params.nthread = threads
    t0 = time.perf_counter()
    L.model_quantize(inp, out, params)
    return {"seconds": time.perf_counter() - t0}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
