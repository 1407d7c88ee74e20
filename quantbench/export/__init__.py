"""Ship a measured recipe: write it in a deployment format, reload it through the runtime's own loader,
and prove it is the model the run measured (README, "Export").

    context.py     rebuild a run (model, windows, calibration) from its directory, fingerprints checked
    job.py         `quantbench export` / the config's `export:` list: re-apply, write, reload, verify
    refuse.py      what each format can express; one-line refusals with the closest exportable recipe
    compressed.py  compressed-tensors checkpoints (vLLM, transformers) from our codes and scales
    gguf*.py       GGUF files (llama.cpp, transformers) through the `gguf` package
    verify.py      reload + bit-for-bit weight comparison + perplexity / max |Δlogit|
    runtime.py     file size, load time and memory, tokens/s (transformers, torchao int8, llama.cpp, vLLM)
    *_probe.py     llama.cpp / vLLM scoring the windows in a child process
    llama_cpp_check.py  llama.cpp re-scoring a llamacpp row's own file: llama_cpp_ppl, max |Δlogit|, agrees
    record.py      export columns in the run's rows, tables, exports.md and report
"""
